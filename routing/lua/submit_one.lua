-- submit_one: reserve a custom_id and create its request in one round trip.
-- Its keys span two slots (tenant, lane), so it is used only on a single Redis node;
-- on Redis Cluster the store reserves and creates in two steps instead.
-- KEYS[1] idempotency key ('' place-holder when there is no custom_id: then KEYS[1] == KEYS[2])
-- KEYS[2] req  KEYS[3] q  KEYS[4] qage  KEYS[5] counts
-- ARGV[1] id  ARGV[2] deadline  ARGV[3] data  ARGV[4] max_queued  ARGV[5] now  ARGV[6] tenant
-- ARGV[7] custom_id  ARGV[8] max_attempts  ARGV[9] QUEUED  ARGV[10] idem value  ARGV[11] idem ttl
-- returns {1} created, {0, existing idem value} duplicate, {-1} lane full, {-2} the deadline or
--   max_attempts is not a finite number (nothing written: Redis cannot order such a request)
local deadline, attempts = tonumber(ARGV[2]), tonumber(ARGV[8])
if not deadline or deadline ~= deadline or deadline == math.huge or deadline == -math.huge
    or not attempts or attempts ~= math.floor(attempts) or attempts < 1 then
  return {-2}
end
if ARGV[7] ~= '' then
  local ok = redis.call('SET', KEYS[1], ARGV[10], 'NX', 'EX', ARGV[11])
  if not ok then return {0, redis.call('GET', KEYS[1])} end
end
local cap = tonumber(ARGV[4])
if cap > 0 and redis.call('ZCARD', KEYS[3]) >= cap then
  if ARGV[7] ~= '' then redis.call('DEL', KEYS[1]) end
  return {-1}
end
redis.call('HSET', KEYS[2], 'state', ARGV[9], 'deadline', ARGV[2], 'data', ARGV[3],
  'created_at', ARGV[5], 'tenant', ARGV[6], 'custom_id', ARGV[7], 'attempts', 0, 'max_attempts', ARGV[8])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1])
redis.call('HINCRBY', KEYS[5], ARGV[9], 1)
redis.call('HINCRBY', KEYS[5], 'submitted_total', 1)
return {1}
