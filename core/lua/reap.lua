-- reap (leader): end expired leases, remove silent pods, lapse drain marks.
--
-- KEYS, ARGV 1-12+pools: the fixed layout in _prelude.lua (no entry, no reply).
-- ARGV[ARG0..]: fencing token ({holder}:{term}), max items per kind.
-- Returns {'fenced'}, {'stale', cfg_version, merchants_version} or
-- {'ok', leases ended, pods removed, drains lapsed, more}: more is 1 when
-- silent pods are left because this call already ended CALL_BUDGET of
-- their calls, or removed a pod only in part (remove_pod works in steps):
-- one script stays short however busy the removed pods were.
--
-- Invariants: nothing changes unless the caller holds the current leader
-- lease; every repair reads an index (no SCAN) and is one atomic step; an
-- expired lease ends its call exactly like a release (lease_expired event);
-- a pod silent past pod_ttl leaves with its calls reported lost; a lapsed
-- drain mark returns a live pod to its free index with its load intact.

local token, limit = ARGV[ARG0], ARGV[ARG0 + 1]
if fenced(token) then return {'fenced'} end
local early = stale()
if early then return early end

local leases = 0
for _, c in ipairs(redis.call('ZRANGEBYSCORE', K.leases, '-inf', H.now, 'LIMIT', 0, limit)) do
  local rec = end_call(c)
  redis.call('ZREM', K.leases, c)
  if rec then
    event('lease_expired', {'call_id', c, 'pod_id', rec.pod, 'pool', rec.pool})
  end
  leases = leases + 1
end

local CALL_BUDGET = REMOVE_STEP
local pods, lost, more = 0, 0, 0
local cutoff = '(' .. int(H.now - H.pod_ttl)
for _, pod in ipairs(redis.call('ZRANGEBYSCORE', K.seen, '-inf', cutoff, 'LIMIT', 0, limit)) do
  if lost >= CALL_BUDGET then more = 1; break end
  local ended, pool, gone = remove_pod(pod, 'pod_silent')
  lost = lost + #ended
  if not gone then more = 1; break end
  event('pod_lost', {'pod_id', pod, 'pool', pool, 'calls', #ended > 0 and cjson.encode(ended) or '[]'})
  pods = pods + 1
end

local drains = 0
for _, pod in ipairs(redis.call('ZRANGEBYSCORE', K.draining, '-inf', H.now, 'LIMIT', 0, limit)) do
  redis.call('ZREM', K.draining, pod)
  refresh_free(pod)
  event('drain_lapsed', {'pod_id', pod, 'pool', redis.call('HGET', K.pool, pod) or ''})
  drains = drains + 1
end
return {'ok', leases, pods, drains, more}
