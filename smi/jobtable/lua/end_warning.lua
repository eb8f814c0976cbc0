-- The janitor has warned of the download's expiry: take the job out of the WARN set
-- and arm EXPIRE at the expiry the job holds now -- but only while the WARN item
-- still has the due time the caller's claim gave it. A resend that armed a new
-- warning meanwhile keeps it, and that warning arms EXPIRE in its turn.
-- One deadline per download at a time, not two: a download's EXPIRE item is armed
-- only once its warning is done (issue_token.lua), which saves a sorted-set entry
-- (about 124 bytes) for every completed job waiting for its warning.
-- ARGV: tag, job_id, expected_ms
-- Returns 1 if the warning was ended here, else 0.
local id, key = ARGV[2], KEYS[1]
local warn = deadline_set('warn')
local score = redis.call('ZSCORE', warn, id)
if not score or tonumber(score) ~= tonumber(ARGV[3]) then return 0 end
redis.call('ZREM', warn, id)
local f = redis.call('HMGET', key, F.status, F.download_expires_at, F.download_expired_at)
if f[1] == 'completed' and f[2] and not f[3] then
  redis.call('ZADD', deadline_set('expire'), f[2], id)
end
return 1
