-- retry_delivery: a delivery failed but may be tried again: note its error, set its next try.
-- A request whose hash is gone (its result expired) leaves the outbox instead.
-- KEYS[1] req  KEYS[2] outbox
-- ARGV[1] id  ARGV[2] error (json)  ARGV[3] due_at (when the next try is due)
-- returns 0 always (ZADD XX moves an existing entry and adds none); nothing reads it
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 0
end
redis.call('HSET', KEYS[1], 'delivery_error', ARGV[2])
return redis.call('ZADD', KEYS[2], 'XX', ARGV[3], ARGV[1])
