-- Record a new download token's hash (the raw token never reaches Redis).
-- ARGV: tag, job_id, now_ms, token_hash, expires_ms, warn_ms ('' = no warning),
--       revoke_others ('1' = the old tokens stop working),
--       keep_later ('1' = never move an existing expiry earlier: a second link for
--       the same download, issued while a resend pushed the expiry out, must not
--       shorten it)
-- Returns {outcome, status, expires_ms}; outcome is applied|missing.
local id, now, hash, expires, warn, revoke = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local key = KEYS[1]
local tokens = lookup_index('tok')
local status = redis.call('HGET', key, 'status')
if not status then return {'missing', '', ''} end
if ARGV[8] == '1' then
  local current = redis.call('HGET', key, 'download_expires_at')
  if current and tonumber(current) > tonumber(expires) then expires, warn = current, '' end
end

local live = {}
local current = redis.call('HGET', key, 'download_token_hashes') or ''
for old in string.gmatch(current, '%S+') do
  if revoke == '1' then redis.call('HDEL', tokens, old) else live[#live + 1] = old end
end
live[#live + 1] = hash
redis.call('HSET', tokens, hash, id)
redis.call('HSET', key, 'download_token_hash', hash, 'download_token_hashes', table.concat(live, ' '),
  'download_expires_at', expires)
redis.call('HDEL', key, 'download_expired_at')
touch(key, id, status, now)
redis.call('ZADD', deadline_set('expire'), expires, id)
if warn ~= '' then redis.call('ZADD', deadline_set('warn'), warn, id) end
return {'applied', status, expires}
