-- submit_many: create many requests of ONE lane shard in one step (one fsync, one reply).
-- KEYS[1] q  KEYS[2] qage  KEYS[3] counts  KEYS[3 + i] the request hash of row i
-- ARGV[1] max_queued (0 = no cap)  ARGV[2] now  ARGV[3] QUEUED
-- ARGV[4] JSON array of [id, deadline, tenant, custom_id, max_attempts, data (json text)]
-- (one argument for the whole chunk: packing thousands of small arguments costs the client
-- more than the script itself).
-- returns one code per request: 1 created, 0 already there, -1 lane full, -2 its deadline or
--   max_attempts is not a finite number (nothing written for it: Redis cannot order it)
local cap = tonumber(ARGV[1])
local depth = redis.call('ZCARD', KEYS[1])
local rows = cjson.decode(ARGV[4])
local out = {}
local created = 0
-- the two sorted sets take every new member in one ZADD each, after the loop: half the calls
-- (a chunk is at most 1000 rows, so 2000 arguments, well inside unpack's limit)
local byDeadline, byAge = {}, {}
local function sound(r)
  local deadline, attempts = tonumber(r[2]), tonumber(r[5])
  return deadline and deadline == deadline and deadline ~= math.huge and deadline ~= -math.huge
    and attempts and attempts == math.floor(attempts) and attempts >= 1
end
for i, r in ipairs(rows) do
  local key = KEYS[3 + i]
  if not sound(r) then
    out[i] = -2
  elseif redis.call('EXISTS', key) == 1 then
    out[i] = 0
  elseif cap > 0 and depth >= cap then
    out[i] = -1
  else
    redis.call('HSET', key, 'state', ARGV[3], 'deadline', r[2], 'data', r[6],
      'created_at', ARGV[2], 'tenant', r[3], 'custom_id', r[4], 'attempts', 0, 'max_attempts', r[5])
    byDeadline[#byDeadline + 1] = r[2]
    byDeadline[#byDeadline + 1] = r[1]
    byAge[#byAge + 1] = ARGV[2]
    byAge[#byAge + 1] = r[1]
    depth = depth + 1
    created = created + 1
    out[i] = 1
  end
end
if created > 0 then
  redis.call('ZADD', KEYS[1], unpack(byDeadline))
  redis.call('ZADD', KEYS[2], unpack(byAge))
  redis.call('HINCRBY', KEYS[3], ARGV[3], created)
  redis.call('HINCRBY', KEYS[3], 'submitted_total', created)
end
return out
