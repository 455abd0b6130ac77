-- drain / undrain: stop, or resume, giving a pod new calls.
--
-- KEYS, ARGV 1-12+pools: the fixed layout in _prelude.lua.
-- ARGV[ARG0..]: pod_id, action (drain|undrain), reason ("" none).
-- Returns {status, reply fields...}: drained | undrained | not_found | expired | dup | stale.
--
-- Invariants: a draining pod is in no free index (left in this same step, so
-- no allocation can pick it afterwards: anchor defect 8); its load and calls
-- are untouched (anchor defect 9: the count is never lost); the mark lapses
-- at now + draining_ttl (the leader returns it then) or on undrain. Draining
-- again refreshes the mark.

local early = begin()
if early then return early end

local pod, action, why = ARGV[ARG0], ARGV[ARG0 + 1], ARGV[ARG0 + 2]
if redis.call('HEXISTS', K.pool, pod) == 0 then
  return finish('not_found', {'error', 'pod ' .. pod .. ' is not registered'})
end
local pool = redis.call('HGET', K.pool, pod)
if action == 'undrain' then
  redis.call('ZREM', K.draining, pod)
  refresh_free(pod)
  event('undrained', {'pod_id', pod, 'pool', pool, 'reason', why})
  return finish('undrained', {'pod_id', pod, 'pool', pool})
end
local until_ms = H.now + H.draining_ttl
redis.call('ZADD', K.draining, until_ms, pod)
unindex(pod)
event('drained', {'pod_id', pod, 'pool', pool, 'reason', why, 'until_ms', int(until_ms),
                  'calls', redis.call('HGET', K.load, pod) or '0'})
return finish('drained', {'pod_id', pod, 'pool', pool})
