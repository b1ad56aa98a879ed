-- hedge_mark: remember requests a late batch just hedged, so their outcome can be judged once
-- they finish (or miss their deadline): a request's id by deadline, and where it came from.
-- The pending set is capped: past ARGV[2] entries, the earliest deadlines are forgotten.
-- KEYS[1] pending (sorted set: id by deadline)  KEYS[2] from (hash: id -> json)
-- ARGV[1] ttl_s of both  ARGV[2] most entries kept
-- ARGV[3..] triples: id, deadline, entry (json [account, model, hedged_at])
-- returns the number of entries now pending
for i = 3, #ARGV do
  if (i - 3) % 3 == 0 then
    redis.call('ZADD', KEYS[1], ARGV[i + 1], ARGV[i])
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 2])
  end
end
local n = redis.call('ZCARD', KEYS[1])
local cap = tonumber(ARGV[2])
if n > cap then
  for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, n - cap - 1)) do
    redis.call('ZREM', KEYS[1], id)
    redis.call('HDEL', KEYS[2], id)
  end
  n = cap
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[1]))
return n
