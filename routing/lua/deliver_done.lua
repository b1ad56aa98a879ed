-- deliver_done: the delivery landed (or was given up on): leave the outbox.
-- KEYS[1] req  KEYS[2] outbox  KEYS[3] counts
-- ARGV[1] id  ARGV[2] now  ARGV[3] ttl_s  ARGV[4] DELIVERED or '' (dead letter: state kept)
-- ARGV[5] error (json, '' when delivered)
-- returns 1 done, 0 already out of the outbox
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then return 0 end
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 0 end
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[1], 'state', ARGV[4], 'delivered_at', ARGV[2], 'updated_at', ARGV[2])
  redis.call('HINCRBY', KEYS[3], state, -1)
  redis.call('HINCRBY', KEYS[3], ARGV[4], 1)
else
  redis.call('HSET', KEYS[1], 'delivery_error', ARGV[5], 'dead_letter', 1, 'updated_at', ARGV[2])
  redis.call('HINCRBY', KEYS[3], 'dead_letters', 1)
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
