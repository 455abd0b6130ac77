-- reject: dead-letter an entry that cannot be processed.
--
-- KEYS, ARGV: the fixed layout in _prelude.lua, with no pools (K.dead is
--   the dead-letter stream, H.dead_max its MAXLEN).
-- ARGV[ARG0..]: error, original fields JSON (masked, cut when oversized),
--   deliveries, "1" when the entry is a config request (its reply carries
--   config_version).
-- Returns {'invalid', 'error', error}, {'dup'}, or {'stale', ...} when the
-- caller passed the config/merchant versions its rejection depended on and
-- Redis holds newer ones (it decides again with a fresh snapshot).
--
-- Invariants: the invalid reply (when the entry had a usable request_id), the
-- dead-letter entry and the XACK happen together, so a bad message is
-- reported exactly once and never blocks the stream. Pool state is untouched.

if not still_pending() then return {'dup'} end
local early = stale()
if early then return early end
local err, payload, deliveries = ARGV[ARG0], ARGV[ARG0 + 1], ARGV[ARG0 + 2]
CONFIG_REPLY = ARGV[ARG0 + 3] == '1'  -- a config request: its reply carries config_version
dead_letter(err, deliveries, payload)
return finish('invalid', config_fields({'error', err}))
