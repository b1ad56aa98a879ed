-- semaphore_count: how many holders are live, by the server's clock.
-- KEYS[1] holders (ZSET token -> lease expiry, server ms)
-- (no ARGV)
-- returns the number of holders whose lease has not run out
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
