-- trim: forget what a lane shard served whose results have expired, so a lane's keys do not
-- grow with the traffic it served: 'finished' entries whose request hash is gone, and dead
-- letters filed before the cutoff (their result, the only thing a replay could send, expired
-- with them). A finished entry past the cutoff whose request still exists (delivered late, its
-- TTL renewed) is kept until its hash goes. Two steps, so every key is in KEYS: the caller reads
-- the entries past the cutoff and passes their hashes; each is re-checked here.
-- KEYS[1] finished  KEYS[2] dead letters  KEYS[3] dead-letter entries  KEYS[4] counts
-- KEYS[4 + i] the request hash of candidate i
-- ARGV[1] cutoff (now - result ttl)  ARGV[2] f: candidates 1..f are finished entries, the rest
--   dead letters  ARGV[2 + i] the id of candidate i
-- counts (KEYS[4]): 'dead_letters' -(dead letters forgotten)
-- returns {finished entries removed, dead letters removed}
local cutoff, f = tonumber(ARGV[1]), tonumber(ARGV[2])
local removed, dead = 0, 0
for i = 1, #ARGV - 2 do
  local id, req = ARGV[2 + i], KEYS[4 + i]
  if i <= f then
    local at = tonumber(redis.call('ZSCORE', KEYS[1], id))
    if at and at < cutoff and redis.call('EXISTS', req) == 0 then
      redis.call('ZREM', KEYS[1], id)
      removed = removed + 1
    end
  else
    local at = tonumber(redis.call('ZSCORE', KEYS[2], id))
    if at and at < cutoff then
      redis.call('ZREM', KEYS[2], id)
      redis.call('HDEL', KEYS[3], id)
      redis.call('HDEL', req, 'dead_letter')
      dead = dead + 1
    end
  end
end
if dead > 0 then redis.call('HINCRBY', KEYS[4], 'dead_letters', -dead) end
return {removed, dead}
