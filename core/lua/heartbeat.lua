-- heartbeat: a pod says it is alive and which calls it serves.
--
-- KEYS, ARGV 1-12+pools: the fixed layout in _prelude.lua.
-- ARGV[ARG0..]: pod_id, calls flag ("1" when the heartbeat listed its calls),
--   then the call ids it listed.
-- Returns {status, reply fields...}: alive | unknown_pod | expired | dup | stale.
--
-- Invariants: only the leases of calls that really are on this pod are
-- renewed (a pod cannot keep another pod's call alive); a pod that was
-- skipped as silent returns to its free index; an unknown pod (e.g. after
-- Redis lost its data) is told so and must register again. No event: a
-- heartbeat is not a change anyone audits.

local early = begin()
if early then return early end

local pod = ARGV[ARG0]
if redis.call('HEXISTS', K.pool, pod) == 0 then
  return finish('unknown_pod', {'pod_id', pod})
end
redis.call('ZADD', K.seen, H.now, pod)
local lease = H.now + H.lease_ttl
for i = ARG0 + 2, #ARGV do
  local c = ARGV[i]
  local raw = redis.call('HGET', K.calls, c)
  if raw and cjson.decode(raw).pod == pod then
    redis.call('ZADD', K.leases, 'XX', lease, c)
  end
end
refresh_free(pod)
return finish('alive', {'pod_id', pod})
