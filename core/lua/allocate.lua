-- allocate: place one call on a pod, idempotently per call_id.
--
-- KEYS, ARGV 1-16+pools: the fixed layout in _prelude.lua.
-- KEYS[KEY0]: the merchants hash (merchant_id -> policy JSON).
-- ARGV[ARG0..]: call_id, merchant_id ("" none), zone (restricted|any),
--   session_url prefix, session_url suffix (url = prefix .. pod_id .. suffix),
--   reasons JSON of the pools the caller excluded before calling ("[]"),
--   required capability, n widen pools, their names (pools outside the
--   chain that tier_mode=flexible would add), n candidates, then the
--   candidate pool names in the order to try.
-- Returns {status, reply fields...}: allocated | rejected | expired | dup | stale,
-- or {'wait'} (no reply, not acknowledged: see below).
--
-- Invariants: a call_id holds at most one pod (a repeat answers the same pod
-- with existing=1, in the same atomic step that would otherwise pick one);
-- a pod's load never exceeds its pool's max_concurrent (only pods in the
-- free index, which holds only pods below max, are picked); a restricted
-- request reads only restricted free indexes; a dedicated pool serves only
-- the merchant whose stored policy names it (v1.1: checked here, against
-- the policy in Redis, whatever the caller passed); a zone=any request takes
-- an open pod anywhere along its chain before any restricted pod.

local early = begin()
if early then return early end

local call_id, merchant, zone = ARGV[ARG0], ARGV[ARG0 + 1], ARGV[ARG0 + 2]
local url_prefix, url_suffix = ARGV[ARG0 + 3], ARGV[ARG0 + 4]
local prereasons, min_cap = ARGV[ARG0 + 5], tonumber(ARGV[ARG0 + 6])
local nwiden = tonumber(ARGV[ARG0 + 7])
local widen = {}
for i = 1, nwiden do widen[i] = ARGV[ARG0 + 7 + i] end
local cand0 = ARG0 + 8 + nwiden
local ncand = tonumber(ARGV[cand0])
local cands = {}
for i = 1, ncand do cands[i] = ARGV[cand0 + i] end

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

-- The pool the stored policy of this request's merchant names, or false.
local own_pool = nil
local function owns(p)
  if not p.dedicated then return true end
  if own_pool == nil then
    own_pool = false
    local raw = merchant ~= '' and redis.call('HGET', KEYS[KEY0], merchant)
    if raw then
      local ok, policy = pcall(cjson.decode, raw)
      if ok and type(policy) == 'table' and type(policy.pool) == 'string' then
        own_pool = policy.pool
      end
    end
  end
  return own_pool == p.name
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

local function place(key, p, pod)
  local load = redis.call('HINCRBY', K.load, pod, 1)
  if load >= p.max then redis.call('ZREM', key, pod) else redis.call('ZADD', key, load, pod) end
  local url = url_prefix .. pod .. url_suffix
  local lease = H.now + H.lease_ttl
  redis.call('HSET', K.calls, call_id, cjson.encode({
    pod = pod, pool = p.name, merchant = merchant,
    zone = redis.call('HGET', K.zone, pod), rzone = zone, rcap = min_cap, at = int(H.now), url = url,
    rid = H.rid}))
  redis.call('ZADD', K.leases, lease, call_id)
  pod_call_add(pod, call_id)
  event('allocated', {'call_id', call_id, 'pod_id', pod, 'pool', p.name,
                      'merchant_id', merchant, 'load', int(load)})
  return finish('allocated', {
    'pod_id', pod, 'pool', p.name,
    'endpoint', redis.call('HGET', K.endpoint, pod) or '',
    'session_url', url, 'lease_expires_ms', int(lease), 'existing', '0'})
end

-- Open pods along the whole chain first (zone=any keeps restricted capacity
-- for restricted calls), then restricted ones; a restricted call reads only
-- restricted indexes.
local passes = {'open', 'restricted'}
if zone == 'restricted' then passes = {'restricted'} end
for _, which in ipairs(passes) do
  for i = 1, ncand do
    local p = P[cands[i]]
    if p and owns(p) then
      local pod = head(p[which], p)
      if pod then return place(p[which], p, pod) end
    end
  end
end

-- Nothing free, but a live pod of a candidate pool is quarantined since
-- Redis changed its history (quarantine.lua): its next heartbeat, seconds
-- away, restores its calls and may free it. The request waits for it rather
-- than get a rejection that is false so soon: {'wait'}, no reply, not
-- acknowledged; the worker runs it again after its next batch
-- (workers/consumer.py) until it is placed, rejected or past its deadline.
-- The set is empty but after a failover or restart: one SMEMBERS of a
-- missing key per rejection.
do
  local quarantined = redis.call('SMEMBERS', K.unwit)
  if #quarantined > 0 then
    local cand = {}
    for i = 1, ncand do cand[cands[i]] = true end
    for _, pod in ipairs(quarantined) do
      local p = P[redis.call('HGET', K.pool, pod) or '']
      if p and cand[p.name] and owns(p) and pod_alive(pod) then return {'wait'} end
    end
  end
end

-- Nothing free: say, pool by pool, every filter that excludes it, and only
-- actions that would help (contract v1.1).
local reasons = cjson.decode(prereasons)
local function add(filter, name, detail, action, extra)
  local r = {filter = filter, pool = name, detail = detail, suggested_action = action}
  if zone == 'restricted' then r.required_zone = 'restricted' end
  for k, v in pairs(extra or {}) do r[k] = v end
  reasons[#reasons + 1] = r
end

-- Restricted pods per pool, counted only when a rejection needs it (one
-- pass over the pod table; never on the allocation path).
local restricted_in = nil
local function restricted_count(p)
  local pods = tonumber(redis.call('HGET', K.count, p.name) or '0')
  if p.zone == 'restricted' then return pods end  -- only restricted pods join it
  if restricted_in == nil then
    restricted_in = {}
    local assigned = redis.call('HGETALL', K.pool)
    for i = 1, #assigned, 2 do
      local pool = assigned[i + 1]
      if redis.call('HGET', K.zone, assigned[i]) == 'restricted' then
        restricted_in[pool] = (restricted_in[pool] or 0) + 1
      end
    end
  end
  return restricted_in[p.name] or 0
end

for i = 1, ncand do
  local name = cands[i]
  local p = P[name]
  if p == nil then
    add('config', name, 'pool ' .. name .. ' is not configured',
      'add tier ' .. name .. ' to the tier config or fix the chain')
  elseif not owns(p) then
    add('merchant', name, 'pool ' .. name .. ' is dedicated to the merchant whose policy names it',
      'send the merchant_id of the merchant whose policy names pool ' .. name)
  else
    local pods = tonumber(redis.call('HGET', K.count, name) or '0')
    local meets = 'zone ' .. p.zone .. ', capability >= ' .. p.cap
    if zone == 'restricted' then
      local restricted = restricted_count(p)
      local free_open = redis.call('ZCARD', p.open)
      if pods == 0 then
        add('capacity', name, 'pool ' .. name .. ' has no pods',
          'register restricted pods that meet pool ' .. name .. ' (capability >= ' .. p.cap .. ')')
      elseif restricted == 0 then
        add('zone', name, 'pool ' .. name .. ' has no restricted pod (' .. pods ..
          ' open pods, ' .. free_open .. ' of them free) and the call needs a restricted pod',
          'register restricted pods that meet pool ' .. name .. ' (capability >= ' .. p.cap .. ')')
      else
        local also = ''
        if free_open > 0 then
          also = '; its ' .. free_open .. ' free open pods do not take restricted calls'
        end
        add('capacity', name, 'pool ' .. name .. ': all ' .. restricted ..
          ' restricted pods are busy (max_concurrent ' .. p.max .. '), draining or silent' .. also,
          'retry shortly, or register more restricted pods in pool ' .. name)
      end
    elseif pods == 0 then
      add('capacity', name, 'pool ' .. name .. ' has no pods',
        'register pods that meet pool ' .. name .. ' (' .. meets .. ')')
    else
      add('capacity', name, 'pool ' .. name .. ': all ' .. pods ..
        ' pods are busy (max_concurrent ' .. p.max .. '), draining or silent',
        'retry shortly, or register more pods that meet pool ' .. name .. ' (' .. meets .. ')')
    end
  end
end

-- tier_mode=flexible is suggested only when a pool it would add has a
-- free pod this call could take now.
local free_elsewhere = {}
for i = 1, nwiden do
  local p = P[widen[i]]
  if p and owns(p) then
    local keys = {p.open, p.restricted}
    if zone == 'restricted' then keys = {p.restricted} end
    for _, key in ipairs(keys) do
      if head(key, p) then free_elsewhere[#free_elsewhere + 1] = p.name; break end
    end
  end
end
if #free_elsewhere > 0 then
  local names = table.concat(free_elsewhere, ', ')
  local r = {filter = 'chain',
    detail = 'pools outside the chain have a free pod for this call: ' .. names,
    suggested_action = 'use tier_mode=flexible, or add ' .. free_elsewhere[1] .. ' to the chain'}
  if zone == 'restricted' then r.required_zone = 'restricted' end
  if min_cap > 1 then r.required_capability = min_cap end
  reasons[#reasons + 1] = r
end
if #reasons == 0 then
  reasons[1] = {filter = 'chain', detail = 'no pool to try',
    suggested_action = 'configure a default_chain or pass a chain'}
end
local encoded = cjson.encode(reasons)
event('rejected', {'call_id', call_id, 'merchant_id', merchant, 'reasons', encoded})
return finish('rejected', {'reasons', encoded})
