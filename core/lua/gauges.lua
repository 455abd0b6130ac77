-- gauges (leader): compute the pool gauges from Redis and store them.
--
-- KEYS, ARGV 1-12+pools: the fixed layout in _prelude.lua (no entry, no reply).
-- KEYS[KEY0]: the gauges hash. ARGV[ARG0..]: fencing token.
-- Returns {'fenced'}, {'stale', ...} or {'ok', gauges JSON}.
--
-- Why here: every replica exports what the leader computed, so all /metrics
-- agree (anchor §12: its gauges were per process and drifted). Pod states:
-- free (idle, takes calls), busy (has calls, takes more), full (at max),
-- draining, silent (past pod_ttl, not yet reaped), unassigned.

local token = ARGV[ARG0]
if fenced(token) then return {'fenced'} end
local early = stale()
if early then return early end
local out = {pools = {}, unassigned = 0, active_calls = redis.call('HLEN', K.calls),
             at_ms = H.now}
for _, p in ipairs(POOLS) do
  out.pools[p.name] = {pods = 0, free = 0, busy = 0, full = 0, draining = 0,
                       silent = 0, calls = 0, free_capacity = 0, max_concurrent = p.max}
end
local assigned = redis.call('HGETALL', K.pool)
for i = 1, #assigned, 2 do
  local pod, pool = assigned[i], assigned[i + 1]
  local g = out.pools[pool]
  if g == nil then
    out.unassigned = out.unassigned + 1
  else
    local load = tonumber(redis.call('HGET', K.load, pod) or '0')
    g.pods = g.pods + 1
    g.calls = g.calls + load
    if redis.call('ZSCORE', K.draining, pod) ~= false then g.draining = g.draining + 1
    elseif not pod_alive(pod) then g.silent = g.silent + 1
    elseif load >= g.max_concurrent then g.full = g.full + 1
    else
      g.free_capacity = g.free_capacity + g.max_concurrent - load
      if load == 0 then g.free = g.free + 1 else g.busy = g.busy + 1 end
    end
  end
end
local json = cjson.encode(out)
redis.call('HSET', KEYS[KEY0], 'json', json, 'token', token)
return {'ok', json}
