-- tierpool prelude: prepended to every script by core/scripts.py.
--
-- Fixed KEYS layout of every script (core/scripts.py CallBuilder builds it;
-- tests/test_scripts.py checks the two agree):
--   1 source stream (the request stream, or pods stream; for leader scripts
--     any stream of the namespace: no entry is checked then)
--   2 reply stream   3 events   4 config:version   5 merchants:version
--   6 pod:pool  7 pod:endpoint  8 pod:zone  9 pod:capability  10 pod:labels
--   11 pod:load 12 pod:callset 13 pod:seen  14 pod:draining   15 pool:count
--   16 calls    17 leases      18 leader    19 dead letters   20 processed
--   21 pod:unwitnessed
--   22.. pool table: per configured pool i (0-based), KEYS[22+2i] free:open
--        and KEYS[23+2i] free:restricted
-- Fixed ARGV layout:
--   1 now_ms ("" = Redis TIME)  2 entry_id ("" = not from a stream)
--   3 request_id ("" = no reply)  4 deadline_ms ("" = none; 0 is long past)
--   5 reply_ttl_ms  6 events_maxlen  7 config_version guard ("" = none)
--   8 merchants_version guard ("" = none)  9 pod_ttl_ms  10 lease_ttl_ms
--   11 draining_ttl_ms  12 dead_maxlen  13 reply kind (allocate, release,
--   drain, config, pod)  14 the subject field the reply echoes (call_id,
--   pod_id; "" = none)  15 its value  16 n pools, then 5 per pool: name,
--   max_concurrent, zone (restricted|open), capability, dedicated ("1": the
--   tier is outside default_chain); script arguments follow (ARGV[ARG0..]),
--   and script keys follow the pool table (KEYS[KEY0..]).
--
-- Free-index invariant kept by every script: a pod is in
-- pool:{P}:free:{Z} with score = its load iff it is registered, assigned to
-- P, of zone Z, alive (seen within pod_ttl), not draining, and its load is
-- below P's max_concurrent, and not unwitnessed.
--
-- pod:unwitnessed holds the pods that take no new call until they list
-- their calls again: quarantine.lua fills it when Redis's replication
-- history changed (a failover to a replica that may have lagged, a
-- restart), and a pod's next register or heartbeat -- which restores the
-- calls it lists first (witness) -- takes it out.
--
-- pod:callset is one sorted set for the namespace, every score 0, member
-- "{pod_id} {call_id}" (ids never hold a space): a pod's calls are one
-- ZRANGEBYLEX, and ending one call or all of a pod's calls costs O(log N)
-- per call, so removing a pod is linear in its calls.
--
-- processed is one sorted set, every score 0, member "{kind}|{ms:16 digits}-{seq}":
-- the entries of each input stream acknowledged by a script since the
-- stream's processed-up-to mark (workers/streams.py keeps the mark and trims
-- the set below it). A consumer group Redis lost is created again at the mark,
-- and an entry it delivers again that is in this set is a 'dup': nothing
-- processed is ever replayed, nothing unprocessed skipped.

local GROUP = 'tierpool'

local K = {
  stream = KEYS[1], reply = KEYS[2], events = KEYS[3],
  cfgv = KEYS[4], mv = KEYS[5],
  pool = KEYS[6], endpoint = KEYS[7], zone = KEYS[8], cap = KEYS[9],
  labels = KEYS[10], load = KEYS[11], pcalls = KEYS[12], seen = KEYS[13],
  draining = KEYS[14], count = KEYS[15], calls = KEYS[16], leases = KEYS[17],
  leader = KEYS[18], dead = KEYS[19], done = KEYS[20], unwit = KEYS[21],
}

local function clock(arg)
  if arg ~= nil and arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local H = {
  now = clock(ARGV[1]), entry = ARGV[2], rid = ARGV[3],
  deadline = tonumber(ARGV[4]), reply_ttl = ARGV[5], events_max = ARGV[6],
  want_cfgv = ARGV[7], want_mv = ARGV[8],
  pod_ttl = tonumber(ARGV[9]), lease_ttl = tonumber(ARGV[10]),
  draining_ttl = tonumber(ARGV[11]), dead_max = ARGV[12],
  kind = ARGV[13], echo_field = ARGV[14], echo_value = ARGV[15],
}

-- The pool table: P[name] = {name, max, zone, cap, dedicated, open = key,
-- restricted = key}.
local P, POOLS = {}, {}
do
  local n = tonumber(ARGV[16])
  for i = 0, n - 1 do
    local p = {
      name = ARGV[17 + 5 * i], max = tonumber(ARGV[18 + 5 * i]),
      zone = ARGV[19 + 5 * i], cap = tonumber(ARGV[20 + 5 * i]),
      dedicated = ARGV[21 + 5 * i] == '1',
      open = KEYS[22 + 2 * i], restricted = KEYS[23 + 2 * i],
    }
    P[p.name] = p
    POOLS[i + 1] = p
  end
end
-- The script's own part: its first ARGV and its first KEYS (after the pool table).
local ARG0 = 17 + 5 * #POOLS
local KEY0 = 22 + 2 * #POOLS

local function int(x) return string.format('%d', x) end

-- The entry's member in the processed set (see the header).
local function done_member()
  local ms, seq = string.match(H.entry, '^(%d+)%-(%d+)$')
  if ms == nil then return nil end
  return string.match(K.stream, '[^:]+$') .. '|' .. string.rep('0', 16 - #ms) .. ms .. '-' .. seq
end

-- Step 1, exactly once: an entry no longer pending was processed by another
-- delivery; an entry in the processed set was processed before its group was
-- lost and created again (it is acknowledged now, and nothing else happens).
-- Returns false, or the number of deliveries so far (1 when the call is not
-- for a stream entry).
local function still_pending()
  if H.entry == '' then return 1 end
  local p = redis.call('XPENDING', K.stream, GROUP, H.entry, H.entry, 1)
  if #p == 0 then return false end
  local m = done_member()
  if m and redis.call('ZSCORE', K.done, m) then
    redis.call('XACK', K.stream, GROUP, H.entry)
    return false
  end
  return p[1][4]
end

local function ack()
  if H.entry ~= '' then
    redis.call('XACK', K.stream, GROUP, H.entry)
    local m = done_member()
    if m then redis.call('ZADD', K.done, 0, m) end
  end
end

-- The reply stream holds exactly one entry: a second delivery never adds one.
-- Every reply says what it answers (v1.1): the request's kind, and its
-- call_id or pod_id, so a requester can tell a reply that is not its own.
local reply_taken = nil  -- does the reply stream exist? nil: not read yet in this call
local function reply(status, fields)
  if H.rid == '' then return end
  if reply_taken == nil then reply_taken = redis.call('EXISTS', K.reply) == 1 end
  if reply_taken then return end
  reply_taken = true
  local args = {'XADD', K.reply, '*', 'request_id', H.rid, 'status', status, 'kind', H.kind}
  local echo = H.echo_field ~= '' and H.echo_value ~= ''
  for i = 1, #fields, 2 do
    if fields[i] == H.echo_field then echo = false end
  end
  if echo then args[#args + 1] = H.echo_field; args[#args + 1] = H.echo_value end
  for i = 1, #fields do args[#args + 1] = fields[i] end
  redis.call(unpack(args))
  redis.call('PEXPIRE', K.reply, H.reply_ttl)
end

local function event(kind, fields)
  local args = {'XADD', K.events, 'MAXLEN', '~', H.events_max, '*',
                'event', kind, 'at_ms', int(H.now)}
  if H.rid ~= '' then args[#args + 1] = 'request_id'; args[#args + 1] = H.rid end
  for i = 1, #fields do args[#args + 1] = fields[i] end
  redis.call(unpack(args))
end

-- Reply, ack, and return {status, fields...} to the caller.
local function finish(status, fields)
  reply(status, fields)
  ack()
  local out = {status}
  for i = 1, #fields do out[#out + 1] = fields[i] end
  return out
end

-- Replies to config requests carry the config version in force (contract),
-- whatever their status; config scripts set this before begin().
local CONFIG_REPLY = false

local function config_fields(fields)
  if CONFIG_REPLY then
    fields[#fields + 1] = 'config_version'
    fields[#fields + 1] = redis.call('GET', K.cfgv) or '0'
  end
  return fields
end

-- The one version guard: {'stale', config_version, merchants_version} when
-- the caller decided with a config (ARGV[7]) or policy set (ARGV[8]) older
-- than Redis holds ("" = not guarded), else nil.
-- The versions are read once per script call: every script guards before
-- it changes a version, and the entries of a batch call (_batch.lua) are
-- allocations and releases, which change none.
local versions = nil
local function stale()
  if H.want_cfgv == '' and H.want_mv == '' then return nil end
  if versions == nil then
    local v = redis.call('MGET', K.cfgv, K.mv)
    versions = {v[1] or '0', v[2] or '0'}
  end
  local cfgv, mv = versions[1], versions[2]
  if (H.want_cfgv ~= '' and H.want_cfgv ~= cfgv) or (H.want_mv ~= '' and H.want_mv ~= mv) then
    return {'stale', cfgv, mv}
  end
  return nil
end

-- The one writer of dead letters: the entry being processed, with the
-- reason. The caller acks (and replies ``invalid`` when it should: ``reply``
-- never overwrites a reply). ``payload``: the
-- entry's fields as JSON when the caller has them (reject.lua: masked, and
-- cut when oversized); nil reads them back from the stream.
-- URL userinfo masked as core/masking.py masks it (the whole userinfo: ***):
-- dead letters written here copy a producer's fields verbatim, and a URL
-- with credentials must not be kept in them.
local function mask_userinfo(text)
  return (string.gsub(text, "(%a[%w%+%.%-]*://)[^%s/?#@'\"<>\\`]*@", "%1***@"))
end

local function dead_letter(err, deliveries, payload)
  if payload == nil then
    local fields = {}
    if H.entry ~= '' then
      local e = redis.call('XRANGE', K.stream, H.entry, H.entry)
      if #e > 0 then
        local kv = e[1][2]
        for i = 1, #kv, 2 do fields[mask_userinfo(kv[i])] = mask_userinfo(kv[i + 1]) end
      end
    end
    payload = cjson.encode(fields)
  end
  redis.call('XADD', K.dead, 'MAXLEN', '~', H.dead_max, '*',
    'stream', K.stream, 'entry_id', H.entry, 'request_id', H.rid, 'error', err,
    'fields', payload, 'deliveries', tostring(deliveries), 'at_ms', int(H.now))
end

-- A request whose request_id already has a reply (unread) takes no effect
-- (v1.1): its sender would read the other request's reply. It is
-- dead-lettered and the existing reply stands. A redelivery of the request
-- that wrote that reply never gets here: that entry is no longer pending.
local RID_IN_USE = 'request_id in use'

-- Steps 1-3 of every request script. Returns a result to return at once, or nil.
local function begin()
  local deliveries = still_pending()
  if not deliveries then return {'dup'} end
  if H.rid ~= '' then reply_taken = redis.call('EXISTS', K.reply) == 1 end
  if reply_taken then
    dead_letter(RID_IN_USE, deliveries)
    ack()
    return {'invalid', 'error', RID_IN_USE}
  end
  if H.deadline ~= nil and H.now > H.deadline then
    return finish('expired', config_fields({'error', 'deadline_ms ' .. int(H.deadline) ..
      ' passed (now ' .. int(H.now) .. '); nothing was changed'}))
  end
  return stale()
end

local function pod_alive(pod)
  local seen = redis.call('ZSCORE', K.seen, pod)
  return seen ~= false and tonumber(seen) + H.pod_ttl >= H.now
end

-- The pod-may-join rule (core/tierconfig.py pod_may_join says the same): a
-- restricted pod meets both zones, an open pod only open pools; the pod's
-- capability is at least the pool's.
local function may_join(p, pod)
  if p.zone == 'restricted' and redis.call('HGET', K.zone, pod) ~= 'restricted' then return false end
  return tonumber(redis.call('HGET', K.cap, pod) or '1') >= p.cap
end

-- Put a pod in, or take it out of, its pool's free index, per the invariant.
-- ``pool`` and ``load``, when the caller just read them, save reading them again.
local function refresh_free(pod, pool, load)
  pool = pool or redis.call('HGET', K.pool, pod)
  if not pool or pool == '' then return end
  local p = P[pool]
  if p == nil then return end
  local zone = redis.call('HGET', K.zone, pod)
  local key, other = p.open, p.restricted
  if zone == 'restricted' then key, other = p.restricted, p.open end
  redis.call('ZREM', other, pod)
  load = load or tonumber(redis.call('HGET', K.load, pod) or '0')
  if load < p.max and pod_alive(pod)
      and redis.call('ZSCORE', K.draining, pod) == false
      and redis.call('SISMEMBER', K.unwit, pod) == 0 then
    redis.call('ZADD', key, load, pod)
  else
    redis.call('ZREM', key, pod)
  end
end

-- Take a pod out of every free index of the pool it is in.
local function unindex(pod)
  local pool = redis.call('HGET', K.pool, pod)
  local p = pool and P[pool]
  if p then
    redis.call('ZREM', p.open, pod)
    redis.call('ZREM', p.restricted, pod)
  end
end

-- The ids of a pod's live calls (pod:calls, see the header).
local function pod_call_ids(pod)
  local out, skip = {}, #pod + 2
  for _, m in ipairs(redis.call('ZRANGEBYLEX', K.pcalls, '[' .. pod .. ' ', '(' .. pod .. '!')) do
    out[#out + 1] = string.sub(m, skip)
  end
  return out
end

local function pod_call_add(pod, call_id)
  redis.call('ZADD', K.pcalls, 0, pod .. ' ' .. call_id)
end

-- Variadic commands take at most this many arguments from one table (Lua's
-- C stack limit is 8000): long lists go in chunks.
local CHUNK = 1000

-- redis.call(cmd, key, fixed..., items[i..j]) for every chunk of ``items``.
local function chunked(cmd, key, items, fixed)
  for i = 1, #items, CHUNK do
    local args = {cmd, key}
    for _, x in ipairs(fixed or {}) do args[#args + 1] = x end
    for j = i, math.min(i + CHUNK - 1, #items) do args[#args + 1] = items[j] end
    redis.call(unpack(args))
  end
end

-- End one live call: its record, lease, place in the pod's list and one unit
-- of the pod's load go together. Returns the decoded record, or nil.
local function end_call(call_id)
  local raw = redis.call('HGET', K.calls, call_id)
  if not raw then return nil end
  local rec = cjson.decode(raw)
  redis.call('HDEL', K.calls, call_id)
  redis.call('ZREM', K.leases, call_id)
  local pod = rec.pod
  redis.call('ZREM', K.pcalls, pod .. ' ' .. call_id)
  local pool = redis.call('HGET', K.pool, pod)
  if pool then
    local load = redis.call('HINCRBY', K.load, pod, -1)
    if load < 0 then redis.call('HSET', K.load, pod, 0); load = 0 end
    refresh_free(pod, pool, load)
  end
  return rec
end

-- A pod is removed in steps of at most this many calls, so one script never
-- holds Redis long however many calls the pod had (500 take about 2 ms).
local REMOVE_STEP = 500

-- Remove a pod and end its calls: linear in its calls, in steps. Returns the
-- ids ended by this step, the pod's pool, and whether the pod is gone. While
-- calls are left the pod stays registered with the rest (a state like any
-- other: the ended calls are simply over), out of its free index and marked
-- draining, so it takes no new call; the caller runs the step again. Each
-- ended call has its call_lost event; records, leases and list entries go
-- with variadic commands (the pod's list is authoritative: records are
-- deleted without being read).
local function remove_pod(pod, why)
  local pool = redis.call('HGET', K.pool, pod)
  local members = redis.call('ZRANGEBYLEX', K.pcalls, '[' .. pod .. ' ', '(' .. pod .. '!',
                             'LIMIT', 0, REMOVE_STEP)
  local ids, skip, at = {}, #pod + 2, int(H.now)
  for i, m in ipairs(members) do
    local c = string.sub(m, skip)
    ids[i] = c
    redis.call('XADD', K.events, '*', 'event', 'call_lost', 'at_ms', at, 'call_id', c,
               'pod_id', pod, 'pool', pool or '', 'reason', why)
  end
  if #ids > 0 then
    redis.call('XTRIM', K.events, 'MAXLEN', '~', H.events_max)
    redis.call('HDEL', K.calls, unpack(ids))
    redis.call('ZREM', K.leases, unpack(ids))
    redis.call('ZREM', K.pcalls, unpack(members))
  end
  if #ids == REMOVE_STEP and #redis.call('ZRANGEBYLEX', K.pcalls, '[' .. pod .. ' ',
                                         '(' .. pod .. '!', 'LIMIT', 0, 1) > 0 then
    local load = redis.call('HINCRBY', K.load, pod, -#ids)
    if load < 0 then redis.call('HSET', K.load, pod, 0) end
    unindex(pod)
    redis.call('ZADD', K.draining, H.now + H.draining_ttl, pod)
    return ids, pool or '', false
  end
  unindex(pod)
  if pool and pool ~= '' then
    if redis.call('HINCRBY', K.count, pool, -1) <= 0 then redis.call('HDEL', K.count, pool) end
  end
  for _, k in ipairs({K.pool, K.endpoint, K.zone, K.cap, K.labels, K.load}) do
    redis.call('HDEL', k, pod)
  end
  redis.call('ZREM', K.seen, pod)
  redis.call('ZREM', K.draining, pod)
  redis.call('SREM', K.unwit, pod)
  return ids, pool or '', true
end

-- The pod is the witness of its own calls (contract v1.1). ``listed``: the
-- call ids the pod says it serves. Each one on this pod has its lease
-- renewed; one Redis does not know (it lost data) is restored on this pod --
-- record, lease, place in its list, load -- while the pod's pool has room; one
-- held by another pod, or past the pool's limit, is a call_conflict event
-- and is never placed twice. A call restored this way is known only from the
-- pod's word, so its lease is short (twice pod_ttl, renewed while the pod
-- lists it): a heartbeat that crossed the call's release holds capacity
-- only until then, when the reaper ends it. Cost: O(listed calls), never
-- O(the pod's calls). The caller refreshes the pod's free index afterwards.
local function witness(pod, listed)
  local lease = H.now + H.lease_ttl
  local short = H.now + math.min(H.lease_ttl, 2 * H.pod_ttl)
  local pool = redis.call('HGET', K.pool, pod) or ''
  local p = P[pool]
  local load = tonumber(redis.call('HGET', K.load, pod) or '0')
  local zone = redis.call('HGET', K.zone, pod) or 'open'
  local cap = tonumber(redis.call('HGET', K.cap, pod) or '1')
  local renew, relist = {}, {}
  for _, c in ipairs(listed) do
    local raw = redis.call('HGET', K.calls, c)
    local mine = raw and string.match(raw, '"pod":"([^"]*)"') == pod
    if mine then
      relist[#relist + 1] = 0
      relist[#relist + 1] = pod .. ' ' .. c
      renew[#renew + 1] = string.find(raw, '"witness":1', 1, true) and short or lease
      renew[#renew + 1] = c
    elseif raw then
      local other = cjson.decode(raw).pod
      event('call_conflict', {'call_id', c, 'pod_id', pod, 'held_by', other,
        'reason', 'the call is held by pod ' .. other .. '; not placed twice'})
    elseif p == nil or load >= p.max then
      event('call_conflict', {'call_id', c, 'pod_id', pod, 'pool', pool,
        'reason', p and ('pod is at max_concurrent ' .. p.max .. ' of pool ' .. pool)
                    or 'pod is in no configured pool'})
    else
      local rzone = 'any'
      if zone == 'restricted' then rzone = 'restricted' end
      redis.call('HSET', K.calls, c, cjson.encode({
        pod = pod, pool = pool, merchant = '', zone = zone, rzone = rzone, rcap = cap,
        at = int(H.now), url = '', rid = '', witness = 1}))
      redis.call('ZADD', K.leases, short, c)
      pod_call_add(pod, c)
      load = load + 1
      redis.call('HSET', K.load, pod, load)
      event('call_restored', {'call_id', c, 'pod_id', pod, 'pool', pool})
    end
  end
  -- Renew the leases; list each call on the pod again (a no-op but for
  -- calls allocated before pod:callset existed: an upgrade repairs itself).
  chunked('ZADD', K.leases, renew, {'XX'})
  chunked('ZADD', K.pcalls, relist, {'NX'})
end

-- Leader scripts: nothing happens unless the caller holds the current lease.
local function fenced(token)
  return redis.call('GET', K.leader) ~= token
end

