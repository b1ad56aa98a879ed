-- submit: create a request in its lane, unless it already exists or the lane is full.
-- KEYS[1] req     hash of the request
-- KEYS[2] q       zset id -> deadline (queued, earliest deadline first)
-- KEYS[3] qage    zset id -> created_at (for the oldest-age gauge)
-- KEYS[4] counts  hash state -> count
-- ARGV[1] id  ARGV[2] deadline  ARGV[3] data (json)  ARGV[4] max_queued (0 = no cap)
-- ARGV[5] now ARGV[6] tenant    ARGV[7] custom_id    ARGV[8] max_attempts  ARGV[9] QUEUED
-- returns {1} created, {0, state} already there, {-1} lane full
local existing = redis.call('HGET', KEYS[1], 'state')
if existing then return {0, existing} end
local cap = tonumber(ARGV[4])
if cap > 0 and redis.call('ZCARD', KEYS[2]) >= cap then return {-1} end
redis.call('HSET', KEYS[1],
  'id', ARGV[1], 'state', ARGV[9], 'deadline', ARGV[2], 'data', ARGV[3],
  'created_at', ARGV[5], 'updated_at', ARGV[5], 'tenant', ARGV[6], 'custom_id', ARGV[7],
  'attempts', 0, 'max_attempts', ARGV[8], 'delivery_attempts', 0)
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
redis.call('HINCRBY', KEYS[4], ARGV[9], 1)
redis.call('HINCRBY', KEYS[4], 'submitted_total', 1)
return {1}
