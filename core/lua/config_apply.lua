-- config_apply: put a new tier config in force, atomically, with a version bump.
--
-- KEYS, ARGV 1-12+pools: the fixed layout in _prelude.lua; the pool table is
--   the NEW config's. ARGV[7] (config_version guard) is the version the caller
--   read and validated against: a newer one in Redis makes this 'stale'.
-- KEYS[KEY0]: tp:{NS}:config; then 2 free-index keys per removed pool.
-- ARGV[ARG0..]: expected_version ("" = none), config JSON (new version
--   embedded), new version, pub/sub channel, n removed pools, their names.
-- Returns {status, reply fields...}: applied | conflict | expired | dup | stale.
--
-- Invariants: config and config:version change together, with the version
-- one more than before; a pod whose pool is removed, or that no longer meets
-- its pool's zone or capability, becomes unassigned (its calls go on; the
-- leader assigns it again); every free index is rebuilt against the new
-- max_concurrent, so no pod is over its new limit in any index.

CONFIG_REPLY = true
local early = begin()
if early then return early end

local expected, json, version = ARGV[ARG0], ARGV[ARG0 + 1], ARGV[ARG0 + 2]
local channel, nremoved = ARGV[ARG0 + 3], tonumber(ARGV[ARG0 + 4])
local config_key = KEYS[KEY0]
local current = redis.call('GET', K.cfgv) or '0'
if expected ~= '' and expected ~= current then
  return finish('conflict', {'config_version', current,
    'error', 'expected_version ' .. expected .. ' but version ' .. current .. ' is in force'})
end

local removed = {}
for i = 0, nremoved - 1 do
  removed[ARGV[ARG0 + 5 + i]] = {KEYS[KEY0 + 1 + 2 * i], KEYS[KEY0 + 2 + 2 * i]}
end

local orphaned = 0
local assigned = redis.call('HGETALL', K.pool)
for i = 1, #assigned, 2 do
  local pod, pool = assigned[i], assigned[i + 1]
  if pool ~= '' then
    local p = P[pool]
    if p == nil or not may_join(p, pod) then
      local old = removed[pool]
      if old then redis.call('ZREM', old[1], pod); redis.call('ZREM', old[2], pod) end
      if p then redis.call('ZREM', p.open, pod); redis.call('ZREM', p.restricted, pod) end
      if redis.call('HINCRBY', K.count, pool, -1) <= 0 then redis.call('HDEL', K.count, pool) end
      redis.call('HSET', K.pool, pod, '')
      orphaned = orphaned + 1
    else
      refresh_free(pod)
    end
  end
end
for name, keys in pairs(removed) do
  redis.call('DEL', keys[1], keys[2])
  redis.call('HDEL', K.count, name)
end

redis.call('SET', config_key, json)
redis.call('SET', K.cfgv, version)
-- PUBLISH for standalone subscribers, SPUBLISH (same channel) for a cluster's (contract v1.1)
redis.call('PUBLISH', channel, version)
redis.call('SPUBLISH', channel, version)
event('config_applied', {'config_version', version, 'previous_version', current,
                         'unassigned_pods', int(orphaned)})
return finish('applied', {'config_version', version})
