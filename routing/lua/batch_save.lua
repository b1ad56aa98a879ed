-- batch_save: write a batch record read earlier, only if nobody wrote it since (compared by
-- the SHA-1 of the stored text), so a poll never overwrites a newer record (collected,
-- adopted, closed).
-- KEYS[1] the batch record
-- ARGV[1] SHA-1 of the text read  ARGV[2] the new record json
-- returns 1 saved, 0 changed since it was read
local current = redis.call('GET', KEYS[1])
if not current or redis.sha1hex(current) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
return 1
