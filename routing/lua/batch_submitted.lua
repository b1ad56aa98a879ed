-- batch_submitted: the provider's batch id, recorded the moment create returns (by the worker
-- that created it) or when an orphan is adopted (by the reconciler that reaped the intent).
-- Fenced: a worker records only an intent still live, a reconciler only one it still reaps, so
-- a worker taken for dead and its reconciler never both decide the batch's fate.
-- KEYS[1] the batch record  KEYS[2] intents  KEYS[3] reaping  KEYS[4] inflight (ZSET by next poll)
-- KEYS[5] byid (HASH provider id -> batch key)
-- ARGV[1] batch key  ARGV[2] 'worker' or 'reaper'  ARGV[3] record json  ARGV[4] provider id
-- ARGV[5] first poll at
-- returns 1 recorded, 0 refused
local index, name = KEYS[2], ARGV[1]
if ARGV[2] == 'reaper' then index, name = KEYS[3], 'intent:' .. ARGV[1] end
if redis.call('ZREM', index, name) == 0 then return 0 end
redis.call('SET', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1])
redis.call('HSET', KEYS[5], ARGV[4], ARGV[1])
return 1
