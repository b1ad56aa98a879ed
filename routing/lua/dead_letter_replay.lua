-- dead_letter_replay: a dead letter goes back into its lane's outbox, with a fresh count of
-- delivery attempts; the sweeper sends it again. Its stored result must still exist.
-- KEYS[1] req  KEYS[2] outbox  KEYS[3] counts
-- ARGV[1] id  ARGV[2] now (also its due time)  ARGV[3] ttl_s of the request hash
-- counts (KEYS[3]): 'dead_letters' -1 when the request carried the dead-letter flag
-- returns 1 replayed, 0 the request (or its outcome) is gone: nothing left to send
if not redis.call('HGET', KEYS[1], 'outcome') then return 0 end
local flagged = redis.call('HDEL', KEYS[1], 'dead_letter')
redis.call('HSET', KEYS[1], 'delivery_attempts', 0, 'updated_at', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
if flagged == 1 then redis.call('HINCRBY', KEYS[3], 'dead_letters', -1) end
return 1
