-- batch_abandon: close a reaped intent whose batch was never created (its members already
-- requeued), unless another reconciler adopted it meanwhile.
-- KEYS[1] the batch record  KEYS[2] reaping  KEYS[3] intents
-- ARGV[1] batch key  ARGV[2] record json  ARGV[3] ttl_s
-- returns 1 closed, 0 no longer reaped by us
if redis.call('ZREM', KEYS[2], 'intent:' .. ARGV[1]) == 0 then return 0 end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
