-- quarantine: Redis answers with a new replication history; the pods must
-- witness their calls again before they take a new one.
--
-- KEYS, ARGV 1-15+pools: the fixed layout in _prelude.lua (no entry, no reply).
-- KEYS[KEY0]: tp:{NS}:replid. ARGV[ARG0]: the server's master_replid now.
-- Returns {'same'} (nothing changed), {'adopted'} (no replid stored while pods
-- exist: state written by a release that kept none; it is stored now),
-- {'fresh'} (no replid, no pod: Redis holds no pool state, every pod must
-- register again, listing its calls), {'quarantined', n pods} or stale.
--
-- Why: a failover to a replica that missed the last writes (or a restart, or
-- a restore of an older RDB) may have lost calls that pods still serve while
-- those pods are still registered and in their free indexes: one of them
-- could be given a new call before its next heartbeat restores the lost
-- one. master_replid changes exactly when the history may have forked, so
-- every registered pod is marked unwitnessed and leaves its free index
-- (refresh_free keeps it out) until its next register or heartbeat, which
-- restores the calls it lists first.
--
-- The stored replid is the compare-and-set: the first worker to see the new
-- replid quarantines and stores it; the others find it stored ('same').
-- Cost: O(registered pods), once per new history.

local s = stale()
if s then return s end

local key, now_id = KEYS[KEY0], ARGV[ARG0]
local was = redis.call('GET', key)
if was == now_id then return {'same'} end
redis.call('SET', key, now_id)
if not was then
  if redis.call('HLEN', K.pool) > 0 then return {'adopted'} end
  return {'fresh'}
end
local pods = redis.call('HKEYS', K.pool)
chunked('SADD', K.unwit, pods)
-- Every registered pod is unwitnessed now, so every free index is empty.
for _, p in ipairs(POOLS) do redis.call('DEL', p.open, p.restricted) end
event('pods_quarantined', {'pods', int(#pods), 'replid', now_id, 'previous_replid', was})
return {'quarantined', #pods}
