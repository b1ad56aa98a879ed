-- batch_byid_trim: remember a closed batch's provider id by when it was created, and forget
-- the ids of batches created before the cutoff, so byid holds in-flight batches and those
-- closed recently, not every batch ever made. The caller sets the cutoff far enough back that
-- no orphan search, of a live intent or a future one, can look at a batch that old.
-- KEYS[1] byid (HASH provider id -> batch key)  KEYS[2] byid_closed (ZSET provider id by created)
-- ARGV[1] provider id of the batch just closed ('' when none)  ARGV[2] its created time
-- ARGV[3] cutoff  ARGV[4] most ids forgotten in one call
-- returns how many ids were forgotten
if ARGV[1] ~= '' and redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
end
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[3], 'LIMIT', 0, tonumber(ARGV[4]))
for _, id in ipairs(old) do
  redis.call('HDEL', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
end
return #old
