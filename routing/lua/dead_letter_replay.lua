-- dead_letter_replay: a dead letter goes back into its lane's outbox, with a fresh count of
-- delivery attempts, and leaves the dead letters in the same step; the sweeper sends it again.
-- Its stored result must still exist: if it expired, the dead letter is kept, for a drop.
-- KEYS[1] req  KEYS[2] outbox  KEYS[3] counts  KEYS[4] dead letters  KEYS[5] dead-letter entries
-- ARGV[1] id  ARGV[2] now (also its due time)  ARGV[3] ttl_s of the request hash
-- counts (KEYS[3]): 'dead_letters' -1
-- returns 1 replayed, 0 its result is gone (nothing left to send), -1 no such dead letter
if not redis.call('ZSCORE', KEYS[4], ARGV[1]) then return -1 end
if not redis.call('HGET', KEYS[1], 'outcome') then return 0 end
redis.call('HDEL', KEYS[1], 'dead_letter')
redis.call('HSET', KEYS[1], 'delivery_attempts', 0, 'updated_at', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[1])
redis.call('HINCRBY', KEYS[3], 'dead_letters', -1)
return 1
