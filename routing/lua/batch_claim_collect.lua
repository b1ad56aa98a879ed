-- batch_claim_collect: one collector at a time. A batch is collected only when its next look
-- is due; the claim pushes that look past the collection's lease, so a second collector finds
-- it not due, and a collector that dies is replaced once the lease runs out.
-- KEYS[1] inflight (ZSET batch key -> next look)
-- ARGV[1] batch key  ARGV[2] now  ARGV[3] lease until
-- returns 1 claimed, 0 another collector holds it (or it is no longer in flight)
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
