-- start: a leased request moves on (CLAIMED -> RUNNING or SUBMITTED), renewing or dropping its lease.
-- KEYS[1] req  KEYS[2] leases  KEYS[3] counts
-- ARGV[1] id  ARGV[2] token  ARGV[3] new state  ARGV[4] lease_until (0 = no lease: the batch
-- registry owns it)  ARGV[5] now  ARGV[6] route  ARGV[7..] states allowed to move
-- returns 1 moved, 0 not ours (lease lost, cancelled, unknown)
local state = redis.call('HGET', KEYS[1], 'state')
if not state or redis.call('HGET', KEYS[1], 'lease_token') ~= ARGV[2] then return 0 end
local allowed = false
for i = 7, #ARGV do if ARGV[i] == state then allowed = true end end
if not allowed then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'route', ARGV[6], 'started_at', ARGV[5],
  'updated_at', ARGV[5], 'lease_until', ARGV[4])
if tonumber(ARGV[4]) > 0 then
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
else
  redis.call('ZREM', KEYS[2], ARGV[1])
end
if state ~= ARGV[3] then
  redis.call('HINCRBY', KEYS[3], state, -1)
  redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
end
return 1
