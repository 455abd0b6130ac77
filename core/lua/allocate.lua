-- allocate: place one call on a pod, idempotently per call_id.
--
-- KEYS, ARGV 1-12+pools: the fixed layout in _prelude.lua.
-- ARGV[ARG0..]: call_id, merchant_id ("" none), zone (restricted|any),
--   session_url prefix, session_url suffix (url = prefix .. pod_id .. suffix),
--   reasons JSON of the pools the caller excluded before calling ("[]"),
--   n candidates, then the candidate pool names in the order to try.
-- Returns {status, reply fields...}: allocated | rejected | expired | dup | stale.
--
-- Invariants: a call_id holds at most one pod (a repeat answers the same pod
-- with existing=1, in the same atomic step that would otherwise pick one);
-- a pod's load never exceeds its pool's max_concurrent (only pods in the
-- free index, which holds only pods below max, are picked); a restricted
-- request reads only restricted free indexes.

local early = begin()
if early then return early end

local call_id, merchant, zone = ARGV[ARG0], ARGV[ARG0 + 1], ARGV[ARG0 + 2]
local url_prefix, url_suffix = ARGV[ARG0 + 3], ARGV[ARG0 + 4]
local prereasons = ARGV[ARG0 + 5]
local ncand = tonumber(ARGV[ARG0 + 6])

local existing = redis.call('HGET', K.calls, call_id)
if existing then
  local rec = cjson.decode(existing)
  local lease = redis.call('ZSCORE', K.leases, call_id)
  return finish('allocated', {
    'pod_id', rec.pod, 'pool', rec.pool,
    'endpoint', redis.call('HGET', K.endpoint, rec.pod) or '',
    'session_url', rec.url, 'lease_expires_ms', lease and int(tonumber(lease)) or '',
    'existing', '1'})
end

-- The least-loaded live pod at the head of a free index, or nil. Pods found
-- dead leave the index (a heartbeat puts them back); nothing else changes.
local function head(key, p)
  while true do
    local h = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    if #h == 0 then return nil end
    local pod = h[1]
    local load = tonumber(redis.call('HGET', K.load, pod) or '0')
    if pod_alive(pod) and load < p.max then return pod, load end
    redis.call('ZREM', key, pod)
  end
end

for i = 1, ncand do
  local p = P[ARGV[ARG0 + 6 + i]]
  if p then
    local keys = {p.open, p.restricted}
    if zone == 'restricted' then keys = {p.restricted} end
    for _, key in ipairs(keys) do
      local pod, load = head(key, p)
      if pod then
        load = redis.call('HINCRBY', K.load, pod, 1)
        if load >= p.max then redis.call('ZREM', key, pod) else redis.call('ZADD', key, load, pod) end
        local url = url_prefix .. pod .. url_suffix
        local lease = H.now + H.lease_ttl
        redis.call('HSET', K.calls, call_id, cjson.encode({
          pod = pod, pool = p.name, merchant = merchant,
          zone = redis.call('HGET', K.zone, pod), rzone = zone, at = int(H.now), url = url,
          rid = H.rid}))
        redis.call('ZADD', K.leases, lease, call_id)
        local cur = redis.call('HGET', K.pcalls, pod)
        if cur and cur ~= '' then cur = cur .. ' ' .. call_id else cur = call_id end
        redis.call('HSET', K.pcalls, pod, cur)
        event('allocated', {'call_id', call_id, 'pod_id', pod, 'pool', p.name,
                            'merchant_id', merchant, 'load', int(load)})
        return finish('allocated', {
          'pod_id', pod, 'pool', p.name,
          'endpoint', redis.call('HGET', K.endpoint, pod) or '',
          'session_url', url, 'lease_expires_ms', int(lease), 'existing', '0'})
      end
    end
  end
end

-- Nothing free: say, pool by pool, why, and what would fix it.
local reasons = cjson.decode(prereasons)
for i = 1, ncand do
  local name = ARGV[ARG0 + 6 + i]
  local p = P[name]
  if p == nil then
    reasons[#reasons + 1] = {filter = 'config', detail = 'pool ' .. name .. ' is not configured',
      suggested_action = 'add tier ' .. name .. ' to the tier config or fix the chain'}
  else
    local pods = tonumber(redis.call('HGET', K.count, name) or '0')
    local free_open = redis.call('ZCARD', p.open)
    if pods == 0 then
      reasons[#reasons + 1] = {filter = 'capacity', detail = 'pool ' .. name .. ' has no pods',
        suggested_action = 'register pods that meet pool ' .. name .. ' or raise its target'}
    elseif zone == 'restricted' and free_open > 0 then
      reasons[#reasons + 1] = {filter = 'zone', detail = 'pool ' .. name .. ' has ' ..
        free_open .. ' free open pods but the call needs a restricted pod',
        suggested_action = 'register restricted pods in pool ' .. name}
    else
      reasons[#reasons + 1] = {filter = 'capacity', detail = 'pool ' .. name .. ': all ' .. pods ..
        ' pods are busy (max_concurrent ' .. p.max .. '), draining or silent',
        suggested_action = 'retry shortly, add pods to pool ' .. name .. ' or allow more pools'}
    end
  end
end
if #reasons == 0 then
  reasons[1] = {filter = 'chain', detail = 'no pool to try',
    suggested_action = 'configure a default_chain or pass a chain'}
end
event('rejected', {'call_id', call_id, 'merchant_id', merchant})
return finish('rejected', {'reasons', cjson.encode(reasons)})
