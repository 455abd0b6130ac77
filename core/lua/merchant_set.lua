-- merchant_set: set or remove one merchant's policy.
--
-- KEYS, ARGV 1-12+pools: the fixed layout in _prelude.lua. ARGV[8] (the
--   merchants_version guard) is the version the caller validated against
--   (that no other merchant owns the pool): a newer one makes this 'stale'.
-- KEYS[KEY0]: the merchants hash.
-- ARGV[ARG0..]: merchant_id, policy JSON ("" = remove), pub/sub channel.
-- Returns {status, reply fields...}: applied | expired | dup | stale. An
--   applied reply carries merchants_version (the policies' own counter) as
--   well as config_version, which a policy change leaves as it was.
--
-- Invariants: the policy and merchants:version change together, so a worker
-- holding an older policy set cannot allocate (its guard goes stale).

CONFIG_REPLY = true
local early = begin()
if early then return early end

local merchant, policy, channel = ARGV[ARG0], ARGV[ARG0 + 1], ARGV[ARG0 + 2]
local hash = KEYS[KEY0]
local kind = 'merchant_set'
if policy == '' then
  redis.call('HDEL', hash, merchant)
  kind = 'merchant_removed'
else
  redis.call('HSET', hash, merchant, policy)
end
local mv = redis.call('INCR', K.mv)
-- PUBLISH for standalone subscribers, SPUBLISH (same channel) for a cluster's (contract v1.1)
redis.call('PUBLISH', channel, 'merchants:' .. mv)
redis.call('SPUBLISH', channel, 'merchants:' .. mv)
event(kind, {'merchant_id', merchant, 'merchants_version', int(mv)})
return finish('applied', {'config_version', redis.call('GET', K.cfgv) or '0',
                          'merchants_version', int(mv)})
