-- register: a pod joins (or rejoins) and is assigned a pool at once.
--
-- KEYS, ARGV 1-12+pools: the fixed layout in _prelude.lua.
-- ARGV[ARG0..]: pod_id, endpoint, zone (restricted|open), capability,
--   labels JSON, fallback pool ("" none: the last chain pool the pod may
--   join), n candidates, then per candidate: pool name, target. Candidates
--   are the pools this pod may join, merchant pools first, then the default
--   chain in order (the caller filters by zone and capability); then the
--   calls flag ("1" when the register listed the pod's calls) and those ids.
-- Returns {status, reply fields...}: registered | expired | dup | stale, or
-- invalid (replied, dead-lettered, acknowledged; nothing else changed) when
-- the pod would change its zone or lower its capability under a call that
-- needs them (contract v1.1).
--
-- Invariants: a pod is counted in exactly one pool; a rejoining pod keeps
-- its pool while it may still join it (the anchor's "existing mark is
-- kept") and keeps its live calls and load; the calls it lists that Redis
-- lost are restored before it enters a free index (witness, _prelude.lua);
-- a restricted call never ends up on an open pod, nor a call on a pod below
-- the capability it required; the free index reflects it.

local early = begin()
if early then return early end

local pod, endpoint, zone = ARGV[ARG0], ARGV[ARG0 + 1], ARGV[ARG0 + 2]
local cap, labels, fallback = ARGV[ARG0 + 3], ARGV[ARG0 + 4], ARGV[ARG0 + 5]
local ncand = tonumber(ARGV[ARG0 + 6])

local may_join = {}
if fallback ~= '' then may_join[fallback] = true end
for i = 0, ncand - 1 do may_join[ARGV[ARG0 + 7 + 2 * i]] = true end

local cur = redis.call('HGET', K.pool, pod)
local known = cur ~= false

local function refuse(why)
  reply('invalid', {'error', why})
  dead_letter(why, 1)
  ack()
  return {'invalid', 'error', why}
end

if known then
  local ids = pod_call_ids(pod)
  local old_zone = redis.call('HGET', K.zone, pod) or 'open'
  local new_cap = tonumber(cap) or 1
  for i = 1, #ids, CHUNK do
    local chunk = {}
    for j = i, math.min(i + CHUNK - 1, #ids) do chunk[#chunk + 1] = ids[j] end
    local recs = redis.call('HMGET', K.calls, unpack(chunk))
    for j, c in ipairs(chunk) do
      if recs[j] then
        local rec = cjson.decode(recs[j])
        if zone ~= old_zone and rec.rzone == 'restricted' and zone ~= 'restricted' then
          return refuse('pod ' .. pod .. ' may not change its zone from ' .. old_zone ..
            ' to ' .. zone .. ' while it holds restricted call ' .. c .. '; nothing was changed')
        end
        if new_cap < (tonumber(rec.rcap) or 1) then
          return refuse('pod ' .. pod .. ' may not lower its capability to ' .. cap ..
            ' while it holds call ' .. c .. ' that requires ' .. int(rec.rcap) ..
            '; nothing was changed')
        end
      end
    end
  end
end
local pool = ''
if cur and cur ~= '' and may_join[cur] then
  pool = cur
else
  for i = 0, ncand - 1 do
    local name, target = ARGV[ARG0 + 7 + 2 * i], tonumber(ARGV[ARG0 + 8 + 2 * i])
    if tonumber(redis.call('HGET', K.count, name) or '0') < target then pool = name; break end
  end
  if pool == '' then pool = fallback end
end

if cur ~= pool then
  if cur and cur ~= '' then
    unindex(pod)
    if redis.call('HINCRBY', K.count, cur, -1) <= 0 then redis.call('HDEL', K.count, cur) end
  end
  if pool ~= '' then redis.call('HINCRBY', K.count, pool, 1) end
end
redis.call('HSET', K.pool, pod, pool)
redis.call('HSET', K.endpoint, pod, endpoint)
redis.call('HSET', K.zone, pod, zone)
redis.call('HSET', K.cap, pod, cap)
redis.call('HSET', K.labels, pod, labels)
redis.call('HSETNX', K.load, pod, 0)
redis.call('ZADD', K.seen, H.now, pod)
local flag = ARG0 + 7 + 2 * ncand
if ARGV[flag] == '1' then
  local listed = {}
  for i = flag + 1, #ARGV do listed[#listed + 1] = ARGV[i] end
  witness(pod, listed)
end
redis.call('SREM', K.unwit, pod)  -- it has witnessed (or cannot): it may take calls again
refresh_free(pod)
local kind = 'pod_registered'
if known then kind = 'pod_reregistered' end
event(kind, {'pod_id', pod, 'pool', pool, 'zone', zone, 'capability', cap, 'previous_pool', cur or ''})
return finish('registered', {'pod_id', pod, 'pool', pool})
