-- gpu_hosts: one GPU host's report of a model (and its aliases), each entry stamped, and every
-- entry of any host older than the cutoff dropped: liveness is per host, and expires per host.
-- KEYS[1] hash of entries: field JSON [model, host, alias ('' for the model itself)] -> at
-- ARGV[1] at (the report's time)  ARGV[2] cutoff: entries stamped before it are dropped
-- ARGV[3] ttl_s of the hash  ARGV[4..] the fields this report stamps
-- returns the number of entries dropped
for i = 4, #ARGV do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[1])
end
local cutoff, dropped = tonumber(ARGV[2]), 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if tonumber(all[i + 1]) < cutoff then
    redis.call('HDEL', KEYS[1], all[i])
    dropped = dropped + 1
  end
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return dropped
