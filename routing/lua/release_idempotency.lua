-- release_idempotency: free the custom_id of a request that was refused (lane full), but only
-- while it still points at that request: a later submitter may already own it.
-- KEYS[1] idempotency key (value "<request id>|<reserved at>")
-- ARGV[1] request id the reservation must name
-- returns 1 released, 0 left alone (gone, or owned by another request)
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. '|' then
  return redis.call('DEL', KEYS[1])
end
return 0
