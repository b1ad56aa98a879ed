-- batch_intent: record a planned batch as an intent (before its provider create) and, in the
-- same step, release its members from the take they came from, so each taken request is
-- always referenced by the take or by an intent. Refused when the take was reaped (its
-- worker was taken for dead and its members requeued).
-- KEYS[1] the batch record (STRING json)  KEYS[2] intents (ZSET batch key -> worker's beat)
-- KEYS[3] the take (HASH id -> token)  KEYS[4] takes (ZSET take id -> worker's beat)
-- ARGV[1] batch key  ARGV[2] record json  ARGV[3] now  ARGV[4] take id ('' when none)
-- ARGV[5..] the batch's request ids
-- returns 1 recorded, 0 the take is no longer this worker's
if ARGV[4] ~= '' then
  if not redis.call('ZSCORE', KEYS[4], ARGV[4]) then return 0 end
  for i = 5, #ARGV do redis.call('HDEL', KEYS[3], ARGV[i]) end
  redis.call('ZADD', KEYS[4], 'XX', ARGV[3], ARGV[4])
end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
