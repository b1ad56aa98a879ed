-- observe: push one observation onto its bounded list and index the list; with a batch key,
-- only once per batch (however many pollers see it end), and the batch leaves the in-flight hash.
-- KEYS[1] seen marker of the batch (a placeholder key when ARGV[6] is '')
-- KEYS[2] observation list  KEYS[3] index set of the lists of this kind  KEYS[4] in-flight hash
-- ARGV[1] entry (json)  ARGV[2] max entries kept  ARGV[3] ttl_s of list and index
-- ARGV[4] ttl_s of the seen marker  ARGV[5] list name, added to the index
-- ARGV[6] batch key ('' when not deduplicated)
-- returns 1 recorded, 0 this batch was recorded before
if ARGV[6] ~= '' then
  if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', tonumber(ARGV[4])) then return 0 end
  redis.call('HDEL', KEYS[4], ARGV[6])
end
redis.call('LPUSH', KEYS[2], ARGV[1])
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[2]) - 1)
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
redis.call('SADD', KEYS[3], ARGV[5])
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[3]))
return 1
