-- dead_letter_adopt: file a dead letter an older version kept in one list for all lanes into
-- its lane's dead letters (once: filing it again changes nothing), and set the lane's count to
-- the number it lists (the older version counted its dead letters with drift).
-- KEYS[1] dead letters (id by when)  KEYS[2] dead-letter entries  KEYS[3] counts
-- ARGV[1] id  ARGV[2] when it was filed  ARGV[3] entry (json)
-- returns 1 filed now, 0 it was already
local new = redis.call('ZADD', KEYS[1], 'NX', ARGV[2], ARGV[1])
redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[3], 'dead_letters', redis.call('ZCARD', KEYS[1]))
return new
