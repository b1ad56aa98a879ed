-- requeue: a leased request goes back to its lane (after ready_at), its attempt already counted.
-- Past max_attempts the caller finishes it as FAILED instead (this returns -1).
-- A request the sweeper takes back while still CLAIMED never started work (it waited in a
-- Celery queue past its lease): that attempt is given back rather than counted.
-- KEYS[1] req  KEYS[2] leases  KEYS[3] q  KEYS[4] qage  KEYS[5] delayed  KEYS[6] counts
-- ARGV[1] id  ARGV[2] token ('*': the sweeper, allowed only once the lease has run out)
-- ARGV[3] now  ARGV[4] ready_at
-- ARGV[5] error (json)  ARGV[6] QUEUED  ARGV[7] CLAIMED  ARGV[8..] states a requeue may come from
-- returns 1 requeued, 0 not ours, -1 attempts exhausted
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 0 end
if ARGV[2] == '*' then
  if tonumber(redis.call('HGET', KEYS[1], 'lease_until') or 0) > tonumber(ARGV[3]) then return 0 end
elseif redis.call('HGET', KEYS[1], 'lease_token') ~= ARGV[2] then
  return 0
end
local allowed = false
for i = 8, #ARGV do if ARGV[i] == state then allowed = true end end
if not allowed then return 0 end
if ARGV[2] == '*' and state == ARGV[7] then
  redis.call('HINCRBY', KEYS[1], 'attempts', -1)
elseif tonumber(redis.call('HGET', KEYS[1], 'attempts')) >= tonumber(redis.call('HGET', KEYS[1], 'max_attempts')) then
  return -1
end
redis.call('HSET', KEYS[1], 'state', ARGV[6], 'last_error', ARGV[5], 'updated_at', ARGV[3],
  'lease_token', '', 'lease_until', 0)
redis.call('ZREM', KEYS[2], ARGV[1])
if tonumber(ARGV[4]) > tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[5], ARGV[4], ARGV[1])
else
  redis.call('ZADD', KEYS[3], redis.call('HGET', KEYS[1], 'deadline'), ARGV[1])
  redis.call('ZADD', KEYS[4], redis.call('HGET', KEYS[1], 'created_at'), ARGV[1])
end
redis.call('HINCRBY', KEYS[6], state, -1)
redis.call('HINCRBY', KEYS[6], ARGV[6], 1)
redis.call('HINCRBY', KEYS[6], 'retries_total', 1)
return 1
