-- semaphore_renew: extend a live holder's lease; a holder whose lease ran out is dropped.
-- KEYS[1] holders (ZSET token -> lease expiry, server ms)
-- ARGV[1] token  ARGV[2] lease in ms
-- returns 1 the token still held a live slot and its lease now runs ARGV[2] from now, else 0
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expiry or tonumber(expiry) <= now then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', now + lease, ARGV[1])
if redis.call('PTTL', KEYS[1]) < lease then
  redis.call('PEXPIRE', KEYS[1], lease)
end
return 1
