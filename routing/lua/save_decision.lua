-- save_decision: keep a request's latest route decision in its hash, for `mixbatch explain`.
-- Only on a request that still exists: never resurrect an expired hash with one field.
-- KEYS[1] req
-- ARGV[1] decision (json)
-- returns 1 saved, 0 the request is gone
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'decision', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'decisions', 1)
return 1
