-- stream_append_once: add a result to a stream unless this request id was added before.
-- KEYS[1] stream  KEYS[2] marker of the request id (same hash slot as the stream)
-- ARGV[1] maxlen (approximate trim)  ARGV[2] marker ttl_s  ARGV[3..] field, value pairs
-- returns {1, entry_id} appended, {0, entry_id} already there
local seen = redis.call('GET', KEYS[2])
if seen then return {0, seen} end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 3))
redis.call('SET', KEYS[2], id, 'EX', ARGV[2])
return {1, id}
