-- dead_letter_drop: forget a dead letter; its stored result stays until its TTL.
-- KEYS[1] req  KEYS[2] counts  KEYS[3] dead letters  KEYS[4] dead-letter entries
-- ARGV[1] id
-- counts (KEYS[2]): 'dead_letters' -1
-- returns 1 forgotten, 0 there was no such dead letter
if redis.call('ZREM', KEYS[3], ARGV[1]) == 0 then return 0 end
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('HDEL', KEYS[1], 'dead_letter')
redis.call('HINCRBY', KEYS[2], 'dead_letters', -1)
return 1
