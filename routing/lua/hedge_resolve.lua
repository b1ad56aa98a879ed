-- hedge_resolve: move judged hedges from pending to their outcome lists, each exactly once
-- (a second resolver that judged the same id finds it gone and records nothing).
-- KEYS[1] pending (sorted set)  KEYS[2] from (hash)  KEYS[3] index (set of list names)
-- KEYS[3 + n] for n = 1, 2, ...: outcome lists, one per list name below
-- ARGV[1] most entries kept per list  ARGV[2] ttl_s of lists and index
-- ARGV[3..] quads: id, n (its list is KEYS[3 + n]; 0 forgets the id with no outcome),
--   entry (json [at, met]), list name
-- returns the number of outcomes recorded
local recorded = 0
for i = 3, #ARGV do
  if (i - 3) % 4 == 0 and redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then
    redis.call('HDEL', KEYS[2], ARGV[i])
    local pick = tonumber(ARGV[i + 1])
    if pick > 0 then
      local list = KEYS[3 + pick]
      redis.call('LPUSH', list, ARGV[i + 2])
      redis.call('LTRIM', list, 0, tonumber(ARGV[1]) - 1)
      redis.call('EXPIRE', list, tonumber(ARGV[2]))
      redis.call('SADD', KEYS[3], ARGV[i + 3])
      redis.call('EXPIRE', KEYS[3], tonumber(ARGV[2]))
      recorded = recorded + 1
    end
  end
end
return recorded
