-- claim: take up to n queued requests of one lane shard, earliest deadline first, under a lease.
-- Two steps, so every key is in KEYS: the caller reads the shard's candidates (the heads of
-- its queue and the delayed retries whose time has come), and this script, given their hashes,
-- re-checks each and claims the earliest n still queued; one taken meanwhile by another claim
-- is skipped. Due retries are promoted to the queue first and compete by their deadline.
-- A stored request whose numbers are not finite numbers (written by an older version, or by
-- hand) is claimed like the others and its problem named in the reply, so the caller fails it
-- alone, with that reason; it never aborts the claim of the others halfway.
-- KEYS[1] q  KEYS[2] qage  KEYS[3] delayed  KEYS[4] leases  KEYS[5] counts
-- KEYS[5 + i] the request hash of candidate i
-- ARGV[1] now  ARGV[2] n  ARGV[3] lease_until  ARGV[4] token  ARGV[5] QUEUED  ARGV[6] CLAIMED
-- ARGV[7] p: candidates 1..p are due retries (from the delayed set), the rest queue heads
-- ARGV[7 + i] the id of candidate i
-- returns a flat list {id, attempts, data, problem, id, attempts, data, problem, ...}
--   (problem: '' when the stored fields are sound, else what is wrong with them)
local now = tonumber(ARGV[1])
local promote = tonumber(ARGV[7])

local function shown(value)
  if not value then return '(missing)' end
  return "'" .. string.sub(value, 1, 40) .. "'"
end

local function finite(value)
  local n = tonumber(value)
  if n == nil or n ~= n or n == math.huge or n == -math.huge then return nil end
  return n
end

for i = 1, promote do
  local id, req = ARGV[7 + i], KEYS[5 + i]
  local ready = tonumber(redis.call('ZSCORE', KEYS[3], id))
  if ready and ready <= now then
    redis.call('ZREM', KEYS[3], id)
    if redis.call('EXISTS', req) == 1 then
      -- a deadline that is no number goes first: the loop below claims it and names the problem
      redis.call('ZADD', KEYS[1], finite(redis.call('HGET', req, 'deadline')) or 0, id)
      redis.call('ZADD', KEYS[2], finite(redis.call('HGET', req, 'created_at')) or now, id)
    end
  end
end

local queued = {}
for i = 1, #ARGV - 7 do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[7 + i])
  if score then table.insert(queued, {tonumber(score), ARGV[7 + i], 5 + i}) end
end
table.sort(queued, function(a, b)
  if a[1] ~= b[1] then return a[1] < b[1] end
  return a[2] < b[2]
end)

local out = {}
for j = 1, math.min(#queued, tonumber(ARGV[2])) do
  local id, req = queued[j][2], KEYS[queued[j][3]]
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  if redis.call('HGET', req, 'state') == ARGV[5] then
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
    redis.call('HSET', req, 'state', ARGV[6], 'attempts', attempts, 'lease_token', ARGV[4],
      'lease_until', ARGV[3], 'claimed_at', ARGV[1], 'updated_at', ARGV[1])
    redis.call('ZADD', KEYS[4], ARGV[3], id)
    redis.call('HINCRBY', KEYS[5], ARGV[5], -1)
    redis.call('HINCRBY', KEYS[5], ARGV[6], 1)
    table.insert(out, id)
    table.insert(out, attempts)
    table.insert(out, redis.call('HGET', req, 'data') or '')
    table.insert(out, problem)
  end
end
return out
