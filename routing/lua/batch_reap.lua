-- batch_reap: claim a take or an intent whose worker stopped beating, for the poller to
-- reconcile; moved to the reaping index under the reconciler's own beat, so a worker that was
-- only slow can no longer record it, and another reconciler takes over if this one dies.
-- KEYS[1] the live index (takes or intents: ZSET name -> worker's beat)
-- KEYS[2] reaping (ZSET '<kind>:<name>' -> reconciler's beat)
-- ARGV[1] name (take id or batch key)  ARGV[2] its name in reaping  ARGV[3] stale before
-- ARGV[4] now
-- returns 1 claimed, 0 alive (or gone)
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) <= tonumber(ARGV[3]) then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[2])
  return 1
end
score = redis.call('ZSCORE', KEYS[2], ARGV[2])
if score and tonumber(score) <= tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[2])
  return 1
end
return 0
