-- release: end one call and give its capacity back to its pod.
--
-- KEYS, ARGV 1-12+pools: the fixed layout in _prelude.lua.
-- ARGV[ARG0..]: call_id, reason ("" none).
-- Returns {status, reply fields...}: released (pod_id, pool, was_draining "1"
-- when the pod is draining: its capacity does not return to service) |
-- not_found | expired | dup | stale.
--
-- Invariants: the record, the lease, the pod's call list and one unit of the
-- pod's load go together; the pod re-enters its free index only when it is
-- alive, not draining and below max (a draining pod never returns to service,
-- shared or not: anchor defect 5). An unknown call changes nothing.

local early = begin()
if early then return early end

local call_id, why = ARGV[ARG0], ARGV[ARG0 + 1]
local rec = end_call(call_id)
if rec == nil then
  return finish('not_found', {'error', 'call ' .. call_id .. ' holds no pod (released already, expired or never allocated)'})
end
-- was_draining: the anchor's release reply field (its pool return was skipped).
local was_draining = redis.call('ZSCORE', K.draining, rec.pod) and '1' or '0'
event('released', {'call_id', call_id, 'pod_id', rec.pod, 'pool', rec.pool, 'reason', why})
return finish('released', {'pod_id', rec.pod, 'pool', rec.pool, 'was_draining', was_draining})
