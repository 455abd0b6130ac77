-- leader_renew (standalone, no prelude): extend the lease if it is still ours.
--
-- KEYS[1] leader. ARGV[1] token, ARGV[2] lease ms. ARGV[3] "release" to give
-- the lease up instead (clean shutdown: the next leader need not wait).
-- Returns 1 when the lease is (was) ours, else 0: the caller stops leading.

if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[3] == 'release' then
  redis.call('DEL', KEYS[1])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
