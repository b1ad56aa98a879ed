-- drop: finish a request wherever it is (queued, delayed or leased) without a lease token:
-- cancel by the caller, expiry by the sweeper. A late answer from a worker is then refused.
-- KEYS[1] req  KEYS[2] q  KEYS[3] qage  KEYS[4] delayed  KEYS[5] leases  KEYS[6] outbox
-- KEYS[7] finished  KEYS[8] counts  KEYS[9] notify
-- ARGV[1] id  ARGV[2] outcome  ARGV[3] result (json)  ARGV[4] now  ARGV[5] ttl_s
-- ARGV[6..] states it may be dropped from
-- counts (KEYS[8]): the state it left -1, the outcome +1, 'route:<route>:<outcome>' +1 (the
--   request's route field, 'none' if it never got one, e.g. cancelled while queued)
-- returns {1, from_state} dropped, {0, state} left alone, {} unknown
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {} end
local allowed = false
for i = 6, #ARGV do if ARGV[i] == state then allowed = true end end
if not allowed then return {0, state} end
for i = 2, 5 do redis.call('ZREM', KEYS[i], ARGV[1]) end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'outcome', ARGV[2], 'result', ARGV[3],
  'finished_at', ARGV[4], 'updated_at', ARGV[4], 'lease_token', '')
redis.call('ZADD', KEYS[6], ARGV[4], ARGV[1])
redis.call('ZADD', KEYS[7], ARGV[4], ARGV[1])
redis.call('HINCRBY', KEYS[8], state, -1)
redis.call('HINCRBY', KEYS[8], ARGV[2], 1)
local route = redis.call('HGET', KEYS[1], 'route')
if not route or route == '' then route = 'none' end
redis.call('HINCRBY', KEYS[8], 'route:' .. route .. ':' .. ARGV[2], 1)
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('DEL', KEYS[9])
redis.call('RPUSH', KEYS[9], ARGV[2])
redis.call('EXPIRE', KEYS[9], ARGV[5])
return {1, state}
