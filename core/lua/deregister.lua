-- deregister: a pod leaves; its calls end and are reported.
--
-- KEYS, ARGV 1-12+pools: the fixed layout in _prelude.lua.
-- ARGV[ARG0..]: pod_id.
-- Returns {status, reply fields...}: deregistered | unknown_pod | expired | dup | stale,
-- or {'more', n} when the pod had more calls than one step ends (remove_pod,
-- _prelude.lua): n calls ended, the entry is not acknowledged, and the caller
-- runs the script again at once.
--
-- Invariants: the pod leaves every index and count in its last step; each
-- of its calls ends with a call_lost event, so nothing points at a pod that
-- is gone (anchor defect 16: the calls are reported, not silently purged);
-- the reply and the pod_deregistered event list the calls the last step ended.

local early = begin()
if early then return early end

local pod = ARGV[ARG0]
if redis.call('HEXISTS', K.pool, pod) == 0 then
  return finish('unknown_pod', {'pod_id', pod})
end
local ended, pool, gone = remove_pod(pod, 'pod_deregistered')
if not gone then return {'more', #ended} end
local calls = '[]'
if #ended > 0 then calls = cjson.encode(ended) end
event('pod_deregistered', {'pod_id', pod, 'pool', pool, 'calls', calls})
return finish('deregistered', {'pod_id', pod, 'pool', pool, 'calls', calls})
