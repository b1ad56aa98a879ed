-- deliver_claim: take a due delivery under a short lease so one worker sends it at a time.
-- KEYS[1] req  KEYS[2] outbox
-- ARGV[1] id  ARGV[2] now  ARGV[3] lease_until
-- returns {delivery_attempts} when claimed, {} when not due or already delivered
local due = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not due or tonumber(due) > tonumber(ARGV[2]) then return {} end
if not redis.call('HGET', KEYS[1], 'outcome') then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return {}
end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return {redis.call('HINCRBY', KEYS[1], 'delivery_attempts', 1)}
