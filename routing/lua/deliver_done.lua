-- deliver_done: the delivery landed: leave the outbox, DELIVERED.
-- KEYS[1] req  KEYS[2] outbox  KEYS[3] counts
-- ARGV[1] id  ARGV[2] now  ARGV[3] ttl_s  ARGV[4] DELIVERED
-- returns 1 done, 0 already out of the outbox (or the request is gone)
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then return 0 end
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[4], 'delivered_at', ARGV[2], 'updated_at', ARGV[2])
redis.call('HINCRBY', KEYS[3], state, -1)
redis.call('HINCRBY', KEYS[3], ARGV[4], 1)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
