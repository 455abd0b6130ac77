-- Batch driver: appended by core/scripts.py after the prelude and a script's
-- body, which it wraps as ``local function one(A) ... end`` (the body's
-- ARGV[...] read A[...]). One EVALSHA then runs the script once per entry of
-- a batch, so the call's own cost (argument conversion, the prelude, the
-- pool table) is paid once per batch instead of once per entry.
--
-- Every entry runs exactly what a call of its own would run -- begin()
-- (pending check, request_id in use, deadline, version guard), the body,
-- reply and ack -- with the prelude's per-call fields set to the entry's.
-- A Lua error in one entry is that entry's error reply; the others'
-- results stand, as in a pipeline of separate calls.
--
-- KEYS: the fixed layout (KEYS[1], KEYS[2] unused), the pool table, the
--   script's own keys (ARGV[ARG0] of them), then per entry: its source
--   stream and its reply stream.
-- ARGV: the fixed header (per-entry fields empty) and the pool table; then
--   ARGV[ARG0] the number of the script's own keys, ARGV[ARG0 + 1] the number
--   of entries, then per entry: entry_id, request_id, deadline_ms, the echo
--   value, the number of the script's arguments, those arguments.
-- Returns one result per entry, in order.

local nkeys, n = tonumber(ARGV[ARG0]), tonumber(ARGV[ARG0 + 1])
local pos, kpos = ARG0 + 2, KEY0 + nkeys
local out = {}
for i = 1, n do
  K.stream, K.reply = KEYS[kpos], KEYS[kpos + 1]
  kpos = kpos + 2
  H.entry, H.rid, H.deadline, H.echo_value = ARGV[pos], ARGV[pos + 1], tonumber(ARGV[pos + 2]), ARGV[pos + 3]
  local nargs = tonumber(ARGV[pos + 4])
  pos = pos + 5
  local A = {}
  for j = 0, nargs - 1 do A[ARG0 + j] = ARGV[pos + j] end
  pos = pos + nargs
  reply_taken = nil
  local ok, res = pcall(one, A)
  if ok then
    out[i] = res
  else
    if type(res) == 'table' and res.err then res = res.err end
    out[i] = {err = tostring(res)}
  end
end
return out
