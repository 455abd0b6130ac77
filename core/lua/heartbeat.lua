-- heartbeat: a pod says it is alive and which calls it serves.
--
-- KEYS, ARGV 1-12+pools: the fixed layout in _prelude.lua.
-- ARGV[ARG0..]: pod_id, calls flag ("1" when the heartbeat listed its calls),
--   then the call ids it listed.
-- Returns {status, reply fields...}: alive | unknown_pod | expired | dup | stale.
--
-- Invariants: only the leases of calls that really are on this pod are
-- renewed (a pod cannot keep another pod's call alive); listed calls Redis
-- lost are restored, conflicting ones reported (witness, _prelude.lua); a pod that was
-- skipped as silent returns to its free index; an unknown pod (e.g. after
-- Redis lost its data) is told so and must register again (listing its
-- calls). No event for a plain heartbeat: it is not a change anyone audits.

local early = begin()
if early then return early end

local pod = ARGV[ARG0]
if redis.call('HEXISTS', K.pool, pod) == 0 then
  return finish('unknown_pod', {'pod_id', pod})
end
redis.call('ZADD', K.seen, H.now, pod)
if ARGV[ARG0 + 1] == '1' then
  local listed = {}
  for i = ARG0 + 2, #ARGV do listed[#listed + 1] = ARGV[i] end
  witness(pod, listed)
end
redis.call('SREM', K.unwit, pod)  -- it has witnessed (or cannot): it may take calls again
refresh_free(pod)
return finish('alive', {'pod_id', pod})
