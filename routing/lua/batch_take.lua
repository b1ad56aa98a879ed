-- batch_take: take up to n staged requests of one pending group, earliest deadline first,
-- removing them from the group; an emptied group leaves the group index.
-- KEYS[1] group members (ZSET id -> deadline)  KEYS[2] group tokens (HASH id -> lease token)
-- KEYS[3] group line sizes (HASH id -> bytes)  KEYS[4] group meta (HASH first_at)
-- KEYS[5] group index (SET of group ids)
-- ARGV[1] n  ARGV[2] group id
-- returns a flat list {id, token, id, token, ...} (token '' when it was missing)
local ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
local out = {}
for _, id in ipairs(ids) do
  table.insert(out, id)
  table.insert(out, redis.call('HGET', KEYS[2], id) or '')
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
  redis.call('HDEL', KEYS[3], id)
end
if redis.call('ZCARD', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[4])
  redis.call('SREM', KEYS[5], ARGV[2])
end
return out
