-- finish: store the result and mark the outcome in one step, so a result always exists
-- before its request is done; queue the delivery and wake waiters.
-- KEYS[1] req  KEYS[2] leases  KEYS[3] outbox  KEYS[4] finished  KEYS[5] counts  KEYS[6] notify
-- ARGV[1] id  ARGV[2] token ('*' skips the lease check)  ARGV[3] outcome  ARGV[4] result (json)
-- ARGV[5] now  ARGV[6] ttl_s  ARGV[7..] states a finish may come from
-- counts (KEYS[5]): the state it left -1, the outcome +1, 'route:<route>:<outcome>' +1 (the
--   request's route field, 'none' if it never got one), 'deadline_misses' +1 when late
-- returns 1 finished, 0 not ours (lease lost, already finished, cancelled)
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 0 end
if ARGV[2] ~= '*' and redis.call('HGET', KEYS[1], 'lease_token') ~= ARGV[2] then return 0 end
local allowed = false
for i = 7, #ARGV do if ARGV[i] == state then allowed = true end end
if not allowed then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'outcome', ARGV[3], 'result', ARGV[4],
  'finished_at', ARGV[5], 'updated_at', ARGV[5], 'lease_token', '')
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1])
redis.call('HINCRBY', KEYS[5], state, -1)
redis.call('HINCRBY', KEYS[5], ARGV[3], 1)
local route = redis.call('HGET', KEYS[1], 'route')
if not route or route == '' then route = 'none' end
redis.call('HINCRBY', KEYS[5], 'route:' .. route .. ':' .. ARGV[3], 1)
if tonumber(ARGV[5]) > tonumber(redis.call('HGET', KEYS[1], 'deadline')) then
  redis.call('HINCRBY', KEYS[5], 'deadline_misses', 1)
end
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('DEL', KEYS[6])
redis.call('RPUSH', KEYS[6], ARGV[3])
redis.call('EXPIRE', KEYS[6], ARGV[6])
return 1
