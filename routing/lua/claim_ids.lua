-- claim_ids: reserve custom_ids of ONE tenant in one step (SET NX EX for each).
-- KEYS[i] idempotency key of item i (all in the tenant's slot)
-- ARGV[1] JSON array of [value ("<request id>|<now>"), ttl_s], one per key (one argument:
-- packing thousands of small arguments costs the client more than the script)
-- returns per key: 1 when reserved by this call, else the value already there
local rows = cjson.decode(ARGV[1])
local out = {}
for i, key in ipairs(KEYS) do
  local ok = redis.call('SET', key, rows[i][1], 'NX', 'EX', rows[i][2])
  if ok then out[i] = 1 else out[i] = redis.call('GET', key) end
end
return out
