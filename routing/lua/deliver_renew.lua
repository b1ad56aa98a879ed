-- deliver_renew: a worker still going through a delivery batch pushes forward the lease of a
-- delivery it holds, before attempting it, so a slow sink earlier in the batch does not leave
-- the later deliveries past their leases (where the sweeper would send them a second time).
-- Fenced: the delivery is ours only while its outbox score is the lease we set and its
-- delivery_attempts is the number our claim returned; one claimed again since, delivered or
-- dead-lettered is left alone.
-- KEYS[1] req  KEYS[2] outbox
-- ARGV[1] id  ARGV[2] attempt (our claim's)  ARGV[3] our lease_until  ARGV[4] new lease_until
-- returns 1 renewed, 0 not ours any more
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not score or tonumber(score) ~= tonumber(ARGV[3]) then return 0 end
if redis.call('HGET', KEYS[1], 'delivery_attempts') ~= ARGV[2] then return 0 end
redis.call('ZADD', KEYS[2], 'XX', ARGV[4], ARGV[1])
return 1
