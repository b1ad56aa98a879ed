-- claim: take up to n queued requests of one lane, earliest deadline first, under a lease.
-- Delayed retries whose time has come are promoted to the queue first.
-- KEYS[1] q  KEYS[2] qage  KEYS[3] delayed  KEYS[4] leases  KEYS[5] counts
-- ARGV[1] now  ARGV[2] n  ARGV[3] lease_until  ARGV[4] token  ARGV[5] req key prefix
-- ARGV[6] QUEUED  ARGV[7] CLAIMED
-- returns a flat list {id, attempts, data, id, attempts, data, ...}
local now = tonumber(ARGV[1])
local ready = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 1000)
for _, id in ipairs(ready) do
  redis.call('ZREM', KEYS[3], id)
  local req = ARGV[5] .. id
  local deadline = redis.call('HGET', req, 'deadline')
  if deadline then
    redis.call('ZADD', KEYS[1], deadline, id)
    redis.call('ZADD', KEYS[2], redis.call('HGET', req, 'created_at'), id)
  end
end
local out = {}
local ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  local req = ARGV[5] .. id
  if redis.call('HGET', req, 'state') == ARGV[6] then
    local attempts = redis.call('HINCRBY', req, 'attempts', 1)
    redis.call('HSET', req, 'state', ARGV[7], 'lease_token', ARGV[4], 'lease_until', ARGV[3],
      'claimed_at', ARGV[1], 'updated_at', ARGV[1])
    redis.call('ZADD', KEYS[4], ARGV[3], id)
    redis.call('HINCRBY', KEYS[5], ARGV[6], -1)
    redis.call('HINCRBY', KEYS[5], ARGV[7], 1)
    table.insert(out, id)
    table.insert(out, attempts)
    table.insert(out, redis.call('HGET', req, 'data'))
  end
end
return out
