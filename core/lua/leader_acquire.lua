-- leader_acquire (standalone, no prelude): take the leader lease if it is free.
--
-- KEYS[1] leader, KEYS[2] leader:term. ARGV[1] holder id, ARGV[2] lease ms.
-- Returns {1, token} when taken (token = holder:term, term bumped), else
-- {0, current token}.
--
-- Invariant: every new term has a larger term number (the fencing token),
-- so a previous holder's token can never match again.

local cur = redis.call('GET', KEYS[1])
if cur then return {0, cur} end
local term = redis.call('INCR', KEYS[2])
local token = ARGV[1] .. ':' .. term
redis.call('SET', KEYS[1], token, 'PX', ARGV[2])
return {1, token}
