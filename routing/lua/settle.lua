-- settle: a request leaves the state it is in, in one step: finished with an outcome (its result
-- stored with it, so a result always exists before its request is done; its delivery queued;
-- waiters woken), or back to its lane after a retryable failure. A retry with no attempt left
-- is FAILED here, in the same step, so no crash leaves it half requeued. Finish, requeue,
-- cancel and expiry all end here, so an outcome is recorded one way only.
-- KEYS[1] req  KEYS[2] leases  KEYS[3] q  KEYS[4] qage  KEYS[5] delayed  KEYS[6] outbox
-- KEYS[7] finished  KEYS[8] counts  KEYS[9] notify
-- ARGV[1] id  ARGV[2] who: the lease token; '*' the sweeper (only once the lease has run out,
--   and a request still CLAIMED, never started, gets its attempt back); '' no lease (cancel, expiry)
-- ARGV[3] where to: an outcome (DONE, FAILED, EXPIRED, CANCELLED), or QUEUED for a retry
-- ARGV[4] the outcome's result (json); for a retry, its error (json)
-- ARGV[5] now  ARGV[6] ttl_s of a finished request  ARGV[7] ready_at (a retry waits until then)
-- ARGV[8] QUEUED  ARGV[9] CLAIMED  ARGV[10] FAILED
-- ARGV[11] ARGV[12] a retry past max_attempts: its FAILED result (json), split where the number
--   of attempts goes
-- ARGV[13] DELIVERED: an outcome with no sink to call is delivered at once, in this same step
--   (no outbox entry, no second script); '' otherwise
-- ARGV[14..] states it may leave
-- counts (KEYS[8]): the state it left -1, the new state +1; an outcome 'route:<route>:<outcome>'
--   +1 ('none' before any route) and, when finished by its lease holder or the sweeper after its
--   deadline, 'deadline_misses' +1; a retry 'retries_total' +1; delivered at once: the outcome
--   -1 and DELIVERED +1 as well
-- returns {1, from_state, new_state} moved (new_state the outcome even when delivered at once),
--   {0, state} left alone (not ours, or not in a state of ARGV[14..]), {} no such request
local id, who, now = ARGV[1], ARGV[2], tonumber(ARGV[5])
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {} end

-- A stored number as a finite Lua number, or `default` (an older version or a hand edit may
-- have stored 'null', 'inf' or 'nan': never let one abort the script halfway).
local function number(field, default)
  local n = tonumber(redis.call('HGET', KEYS[1], field))
  if n == nil or n ~= n or n == math.huge or n == -math.huge then return default end
  return n
end

if who == '*' then
  if number('lease_until', 0) > now then return {0, state} end
elseif who ~= '' and redis.call('HGET', KEYS[1], 'lease_token') ~= who then
  return {0, state}
end
local allowed = false
for i = 14, #ARGV do if ARGV[i] == state then allowed = true end end
if not allowed then return {0, state} end

local function leave(to)
  for i = 2, 5 do redis.call('ZREM', KEYS[i], id) end
  redis.call('HINCRBY', KEYS[8], state, -1)
  redis.call('HINCRBY', KEYS[8], to, 1)
end

local function finish(outcome, result)
  leave(outcome)
  redis.call('HSET', KEYS[1], 'state', outcome, 'outcome', outcome, 'result', result,
    'finished_at', ARGV[5], 'updated_at', ARGV[5], 'lease_token', '', 'lease_until', 0)
  if ARGV[13] ~= '' then
    redis.call('HSET', KEYS[1], 'state', ARGV[13], 'delivered_at', ARGV[5])
    redis.call('HINCRBY', KEYS[8], outcome, -1)
    redis.call('HINCRBY', KEYS[8], ARGV[13], 1)
  else
    redis.call('ZADD', KEYS[6], ARGV[5], id)
  end
  redis.call('ZADD', KEYS[7], ARGV[5], id)
  local route = redis.call('HGET', KEYS[1], 'route')
  if not route or route == '' then route = 'none' end
  redis.call('HINCRBY', KEYS[8], 'route:' .. route .. ':' .. outcome, 1)
  if who ~= '' and now > number('deadline', math.huge) then
    redis.call('HINCRBY', KEYS[8], 'deadline_misses', 1)
  end
  redis.call('EXPIRE', KEYS[1], ARGV[6])
  redis.call('DEL', KEYS[9])
  redis.call('RPUSH', KEYS[9], outcome)
  redis.call('EXPIRE', KEYS[9], ARGV[6])
  return {1, state, outcome}
end

if ARGV[3] ~= ARGV[8] then return finish(ARGV[3], ARGV[4]) end

local attempts = number('attempts', 0)
if who == '*' and state == ARGV[9] then
  redis.call('HSET', KEYS[1], 'attempts', math.max(attempts - 1, 0))
elseif attempts >= number('max_attempts', 1) then
  return finish(ARGV[10], ARGV[11] .. attempts .. ARGV[12])
end
leave(ARGV[8])
redis.call('HSET', KEYS[1], 'state', ARGV[8], 'last_error', ARGV[4], 'updated_at', ARGV[5],
  'lease_token', '', 'lease_until', 0)
if tonumber(ARGV[7]) > now then
  redis.call('ZADD', KEYS[5], ARGV[7], id)
else
  redis.call('ZADD', KEYS[3], number('deadline', 0), id)
  redis.call('ZADD', KEYS[4], number('created_at', now), id)
end
redis.call('HINCRBY', KEYS[8], 'retries_total', 1)
return {1, state, ARGV[8]}
