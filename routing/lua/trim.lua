-- trim: forget what a lane served whose results have expired, so a lane's keys do not grow
-- with the traffic it served: 'finished' entries whose request hash is gone, and dead letters
-- filed before the cutoff (their result, the only thing a replay could send, expired with them).
-- A finished entry past the cutoff whose request still exists (delivered late, its TTL renewed)
-- is kept until its hash goes.
-- KEYS[1] finished  KEYS[2] dead letters  KEYS[3] dead-letter entries  KEYS[4] counts
-- ARGV[1] cutoff (now - result ttl)  ARGV[2] req key prefix  ARGV[3] most entries to look at
-- counts (KEYS[4]): 'dead_letters' -(dead letters forgotten)
-- returns {finished entries removed, dead letters removed}
local budget = tonumber(ARGV[3])
local removed, kept = 0, 0
while removed + kept < budget do
  local page = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1], 'LIMIT', kept, 500)
  if #page == 0 then break end
  for _, id in ipairs(page) do
    if redis.call('EXISTS', ARGV[2] .. id) == 0 then
      redis.call('ZREM', KEYS[1], id)
      removed = removed + 1
    else
      kept = kept + 1
    end
  end
end
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[1], 'LIMIT', 0, budget)
for _, id in ipairs(dead) do
  redis.call('ZREM', KEYS[2], id)
  redis.call('HDEL', KEYS[3], id)
  redis.call('HDEL', ARGV[2] .. id, 'dead_letter')
end
if #dead > 0 then redis.call('HINCRBY', KEYS[4], 'dead_letters', -#dead) end
return {removed, #dead}
