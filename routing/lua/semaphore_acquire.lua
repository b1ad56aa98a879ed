-- semaphore_acquire: drop expired holders, then admit one more while under the limit.
-- Time is the server's (milliseconds), so hosts with skewed clocks agree. The key's own TTL
-- follows the longest lease, so an abandoned semaphore leaves nothing behind.
-- KEYS[1] holders (ZSET token -> lease expiry, server ms)
-- ARGV[1] limit  ARGV[2] token  ARGV[3] lease in ms
-- returns 1 the token now holds a slot, 0 the semaphore is full
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + lease, ARGV[2])
if redis.call('PTTL', KEYS[1]) < lease then
  redis.call('PEXPIRE', KEYS[1], lease)
end
return 1
