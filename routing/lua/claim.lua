-- claim: take up to n queued requests of one lane, earliest deadline first, under a lease.
-- Delayed retries whose time has come are promoted to the queue first. A stored request whose
-- numbers are not finite numbers (written by an older version, or by hand) is claimed like the
-- others and its problem named in the reply, so the caller fails it alone, with that reason;
-- it never aborts the claim of the others halfway.
-- KEYS[1] q  KEYS[2] qage  KEYS[3] delayed  KEYS[4] leases  KEYS[5] counts
-- ARGV[1] now  ARGV[2] n  ARGV[3] lease_until  ARGV[4] token  ARGV[5] req key prefix
-- ARGV[6] QUEUED  ARGV[7] CLAIMED
-- returns a flat list {id, attempts, data, problem, id, attempts, data, problem, ...}
--   (problem: '' when the stored fields are sound, else what is wrong with them)
local now = tonumber(ARGV[1])

local function shown(value)
  if not value then return '(missing)' end
  return "'" .. string.sub(value, 1, 40) .. "'"
end

local function finite(value)
  local n = tonumber(value)
  if n == nil or n ~= n or n == math.huge or n == -math.huge then return nil end
  return n
end

local ready = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 1000)
for _, id in ipairs(ready) do
  redis.call('ZREM', KEYS[3], id)
  local req = ARGV[5] .. id
  if redis.call('EXISTS', req) == 1 then
    -- a deadline that is no number goes first: the loop below claims it and names the problem
    redis.call('ZADD', KEYS[1], finite(redis.call('HGET', req, 'deadline')) or 0, id)
    redis.call('ZADD', KEYS[2], finite(redis.call('HGET', req, 'created_at')) or now, id)
  end
end
local out = {}
local ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  local req = ARGV[5] .. id
  if redis.call('HGET', req, 'state') == ARGV[6] then
    local problem = ''
    local raw = redis.call('HGET', req, 'deadline')
    if not finite(raw) then
      problem = 'its deadline ' .. shown(raw) .. ' is not a finite number'
    end
    local attempts = finite(redis.call('HGET', req, 'attempts') or 0)
    if not attempts or attempts ~= math.floor(attempts) or attempts < 0 then
      problem = 'its attempts ' .. shown(redis.call('HGET', req, 'attempts')) .. ' is not a count'
      attempts = 0
    end
    attempts = attempts + 1
    redis.call('HSET', req, 'state', ARGV[7], 'attempts', attempts, 'lease_token', ARGV[4],
      'lease_until', ARGV[3], 'claimed_at', ARGV[1], 'updated_at', ARGV[1])
    redis.call('ZADD', KEYS[4], ARGV[3], id)
    redis.call('HINCRBY', KEYS[5], ARGV[6], -1)
    redis.call('HINCRBY', KEYS[5], ARGV[7], 1)
    table.insert(out, id)
    table.insert(out, attempts)
    table.insert(out, redis.call('HGET', req, 'data') or '')
    table.insert(out, problem)
  end
end
return out
