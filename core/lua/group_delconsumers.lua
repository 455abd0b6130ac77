-- group_delconsumers (standalone, no prelude): remove consumers that own nothing.
--
-- KEYS[i] the stream of the i-th consumer. ARGV[1] the group, ARGV[1 + i] the
-- i-th consumer name.
-- Returns the names removed (in order; a consumer owning entries is kept).
--
-- Invariant: XGROUP DELCONSUMER drops a consumer's pending entries from the
-- group, which would lose them for good. The check that it owns none and the
-- delete are one atomic step, so no entry read in between can be lost, and a
-- caller killed at any point leaves every entry pending or processed.

local out = {}
for i = 1, #KEYS do
  local name = ARGV[1 + i]
  if #redis.call('XPENDING', KEYS[i], ARGV[1], '-', '+', 1, name) == 0 then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[i], ARGV[1], name)
    out[#out + 1] = name
  end
end
return out
