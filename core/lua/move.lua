-- move (leader): assign an unassigned pod, or move an idle pod to another pool.
--
-- KEYS, ARGV 1-12+pools: the fixed layout in _prelude.lua (no entry, no reply).
-- ARGV[ARG0..]: fencing token, pod_id, from pool ("" = unassigned), to pool,
--   reason (assign|rebalance).
-- Returns {'fenced'}, {'stale', ...}, {'moved'} or {'skipped', why}.
--
-- Invariants: only the current leader moves pods; a pod leaving a pool must
-- be idle: no call, no load, no drain mark (anchor: never move a busy,
-- leased or draining pod); a pod enters only a pool whose zone and
-- capability it meets (may_join), whatever the plan read; the pod is counted
-- in exactly one pool and its free index entry follows it in the same step.

local token, pod, from, to, why = ARGV[ARG0], ARGV[ARG0 + 1], ARGV[ARG0 + 2], ARGV[ARG0 + 3], ARGV[ARG0 + 4]
if fenced(token) then return {'fenced'} end
local early = stale()
if early then return early end
local cur = redis.call('HGET', K.pool, pod)
if cur == false then return {'skipped', 'pod is not registered'} end
if cur ~= from then return {'skipped', 'pod is in pool ' .. cur .. ', not ' .. from} end
if P[to] == nil then return {'skipped', 'pool ' .. to .. ' is not configured'} end
if not may_join(P[to], pod) then
  return {'skipped', 'pod does not meet pool ' .. to .. "'s zone or capability"}
end
if from ~= '' then
  if tonumber(redis.call('HGET', K.load, pod) or '0') > 0 then return {'skipped', 'pod has calls'} end
  if redis.call('ZSCORE', K.draining, pod) ~= false then return {'skipped', 'pod is draining'} end
  unindex(pod)
  if redis.call('HINCRBY', K.count, from, -1) <= 0 then redis.call('HDEL', K.count, from) end
end
redis.call('HINCRBY', K.count, to, 1)
redis.call('HSET', K.pool, pod, to)
refresh_free(pod)
event('pod_moved', {'pod_id', pod, 'from', from, 'to', to, 'reason', why})
return {'moved'}
