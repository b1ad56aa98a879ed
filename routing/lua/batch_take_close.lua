-- batch_take_close: the submit step is done with a take (each member is in an intent, failed,
-- or was no longer held): forget it, unless it was reaped meanwhile (then the reaper owns it).
-- KEYS[1] the take (HASH id -> token)  KEYS[2] takes (ZSET take id -> worker's beat)
-- ARGV[1] take id
-- returns 1 closed, 0 reaped (or already closed)
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('DEL', KEYS[1])
return 1
