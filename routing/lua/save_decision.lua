-- save_decision: keep requests' latest route decisions in their hashes, for `mixbatch explain`;
-- a claim's decisions in one call per lane shard (its request hashes share one slot).
-- Only on a request that still exists: never resurrect an expired hash with one field.
-- KEYS[1..n] req, one per request
-- ARGV[1] m, how many distinct decisions follow (a class of requests shares one record)
-- ARGV[2..m+1] decision (json)
-- ARGV[m+1+i] which of them KEYS[i] keeps (1..m)
-- returns how many were saved (a request that is gone is skipped)
local m = tonumber(ARGV[1])
local saved = 0
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    redis.call('HSET', key, 'decision', ARGV[1 + tonumber(ARGV[m + 1 + i])])
    redis.call('HINCRBY', key, 'decisions', 1)
    saved = saved + 1
  end
end
return saved
