-- ledger_add: add finished requests' costs to the totals in one step, capping the number of
-- distinct spend tags: past the cap, a new tag's amounts go to 'tag:other', so the ledger's
-- size is bounded whatever metadata producers send. The 'route:*' and 'all' rows are also added
-- to the hour's own hash, which expires, so the series over time is bounded too.
-- KEYS[1] ledger (hash: '<measure>|<field>' -> total; 'meta|tags' the number of distinct tags)
-- KEYS[2] the hour's totals (hash: '<measure>|route:NAME' and '<measure>|all'; same slot)
-- ARGV[1] most distinct tags  ARGV[2] JSON array of [field, cost_usd, saved_usd, count], the
--   amounts as decimal strings (kept exact; Lua numbers would round them)
-- ARGV[3] seconds the hour's hash is kept
-- returns the number of tag rows folded into 'tag:other'
local cap = tonumber(ARGV[1])
local tags = tonumber(redis.call('HGET', KEYS[1], 'meta|tags') or 0)
local folded = 0
for _, row in ipairs(cjson.decode(ARGV[2])) do
  local field = row[1]
  if string.sub(field, 1, 4) == 'tag:' and field ~= 'tag:other'
      and redis.call('HEXISTS', KEYS[1], 'count|' .. field) == 0 then
    if tags >= cap then
      field = 'tag:other'
      folded = folded + 1
    else
      tags = tags + 1
      redis.call('HSET', KEYS[1], 'meta|tags', tags)
    end
  end
  redis.call('HINCRBYFLOAT', KEYS[1], 'cost|' .. field, row[2])
  redis.call('HINCRBYFLOAT', KEYS[1], 'saved|' .. field, row[3])
  redis.call('HINCRBY', KEYS[1], 'count|' .. field, row[4])
  if field == 'all' or string.sub(field, 1, 6) == 'route:' then
    redis.call('HINCRBYFLOAT', KEYS[2], 'cost|' .. field, row[2])
    redis.call('HINCRBYFLOAT', KEYS[2], 'saved|' .. field, row[3])
    redis.call('HINCRBY', KEYS[2], 'count|' .. field, row[4])
    redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
  end
end
return folded
