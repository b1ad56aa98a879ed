-- renew: a running worker's heartbeat pushes its request's lease forward, so only a dead
-- worker's lease runs out. Token-checked: a request requeued, cancelled or finished meanwhile
-- is not ours any more and is left alone. A lease is only ever extended, never shortened.
-- KEYS[1] req  KEYS[2] leases
-- ARGV[1] id  ARGV[2] token  ARGV[3] new lease_until  ARGV[4..] leased states (CLAIMED, RUNNING)
-- returns 1 the lease is ours and runs at least to ARGV[3], 0 not ours (lost, finished, unknown)
local state = redis.call('HGET', KEYS[1], 'state')
if not state or redis.call('HGET', KEYS[1], 'lease_token') ~= ARGV[2] then return 0 end
local leased = false
for i = 4, #ARGV do if ARGV[i] == state then leased = true end end
if not leased then return 0 end
if tonumber(ARGV[3]) > tonumber(redis.call('HGET', KEYS[1], 'lease_until') or 0) then
  redis.call('HSET', KEYS[1], 'lease_until', ARGV[3])
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
end
return 1
