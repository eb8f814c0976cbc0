-- Drop a member from a deadline set, but only while its due time is still the one
-- the caller expects: the lease its claim_due set. A deadline armed again since (a
-- resend's new expiry warning, a new purge after a retried job failed again) has
-- another score and stays.
-- KEYS[1]: the deadline set. ARGV: tag, member, expected_ms
-- Returns 1 if the member was removed, else 0.
local score = redis.call('ZSCORE', KEYS[1], ARGV[2])
if score and tonumber(score) == tonumber(ARGV[3]) then
  return redis.call('ZREM', KEYS[1], ARGV[2])
end
return 0
