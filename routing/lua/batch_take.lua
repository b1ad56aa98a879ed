-- batch_take: take up to n staged requests of one pending group, earliest deadline first,
-- and write them, in the same step, into a durable take record that the submit step empties
-- as it records each batch's intent; an emptied group leaves the group index. A flusher that
-- dies before its intents are recorded leaves the take, and the poller requeues its members.
-- KEYS[1] group members (ZSET id -> deadline)  KEYS[2] group tokens (HASH id -> lease token)
-- KEYS[3] group line sizes (HASH id -> bytes)  KEYS[4] group meta (HASH first_at)
-- KEYS[5] group index (SET of group ids)  KEYS[6] the take (HASH id -> lease token)
-- KEYS[7] takes (ZSET take id -> its worker's last beat)
-- ARGV[1] n  ARGV[2] group id  ARGV[3] take id  ARGV[4] now
-- returns a flat list {id, token, id, token, ...} (token '' when it was missing)
local ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
local out = {}
for _, id in ipairs(ids) do
  local token = redis.call('HGET', KEYS[2], id) or ''
  table.insert(out, id)
  table.insert(out, token)
  redis.call('HSET', KEYS[6], id, token)
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
  redis.call('HDEL', KEYS[3], id)
end
if #ids > 0 then
  redis.call('ZADD', KEYS[7], ARGV[4], ARGV[3])
end
if redis.call('ZCARD', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[4])
  redis.call('SREM', KEYS[5], ARGV[2])
end
return out
