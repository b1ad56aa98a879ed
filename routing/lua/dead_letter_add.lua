-- dead_letter_add: give up on a delivery in one step: out of the outbox, into the lane's
-- dead letters with its last error; the request keeps its result (and its state) until its TTL.
-- KEYS[1] req  KEYS[2] outbox  KEYS[3] counts  KEYS[4] dead letters (id by when)
-- KEYS[5] dead-letter entries (id -> entry json)
-- ARGV[1] id  ARGV[2] now  ARGV[3] ttl_s  ARGV[4] error (json)  ARGV[5] entry (json)
-- counts (KEYS[3]): 'dead_letters' +1 (the number of the lane's dead letters)
-- returns 1 filed, 0 not in the outbox any more (delivered meanwhile, or gone)
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then return 0 end
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'delivery_error', ARGV[4], 'dead_letter', 1, 'updated_at', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
if redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1]) == 1 then
  redis.call('HINCRBY', KEYS[3], 'dead_letters', 1)
end
redis.call('HSET', KEYS[5], ARGV[1], ARGV[5])
return 1
