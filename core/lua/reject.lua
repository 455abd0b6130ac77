-- reject: dead-letter an entry that cannot be processed.
--
-- KEYS, ARGV 1-12: the fixed layout in _prelude.lua, with no pools.
-- KEYS[19]: the dead-letter stream.
-- ARGV[ARG0..]: error, original fields JSON, dead stream maxlen, deliveries.
-- Returns {'invalid', 'error', error} or {'dup'}.
--
-- Invariants: the invalid reply (when the entry had a usable request_id), the
-- dead-letter entry and the XACK happen together, so a bad message is
-- reported exactly once and never blocks the stream. Pool state is untouched.

if not still_pending() then return {'dup'} end
local err, payload, maxlen, deliveries = ARGV[ARG0], ARGV[ARG0 + 1], ARGV[ARG0 + 2], ARGV[ARG0 + 3]
redis.call('XADD', KEYS[19], 'MAXLEN', '~', maxlen, '*',
  'stream', K.stream, 'entry_id', H.entry, 'request_id', H.rid, 'error', err,
  'fields', payload, 'deliveries', deliveries, 'at_ms', int(H.now))
return finish('invalid', {'error', err})
