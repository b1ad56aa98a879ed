-- dead_letter_drop: forget a request's dead-letter flag; its stored result stays until its TTL.
-- KEYS[1] req  KEYS[2] counts
-- (no ARGV)
-- counts (KEYS[2]): 'dead_letters' -1 when the flag was there
-- returns 1 the flag was cleared, 0 there was none
if redis.call('HDEL', KEYS[1], 'dead_letter') == 0 then return 0 end
redis.call('HINCRBY', KEYS[2], 'dead_letters', -1)
return 1
