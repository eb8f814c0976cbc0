-- Record a new download token's hash (the raw token never reaches Redis).
-- ARGV: tag, job_id, now_ms, token_hash, expires_ms, warn_ms ('' = no warning),
--       revoke_others ('1' = the old tokens stop working),
--       keep_later ('1' = never move an existing expiry earlier: a second link for
--       the same download, issued while a resend pushed the expiry out, must not
--       shorten it)
-- Returns {outcome, status, expires_ms}; outcome is applied|missing|expired.
-- An expired download gets no new token: the janitor deletes its files right after
-- recording the expiry, so a link issued now (a resend that read the job before the
-- expiry) would lead to nothing.
local id, now, hash, expires, warn, revoke = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local key = KEYS[1]
local tokens = lookup_index(TOKEN_LOOKUP)
local status = redis.call('HGET', key, F.status)
if not status then return {'missing', '', ''} end
if redis.call('HEXISTS', key, F.download_expired_at) == 1 then return {'expired', status, ''} end
if ARGV[8] == '1' then
  local current = redis.call('HGET', key, F.download_expires_at)
  if current and tonumber(current) > tonumber(expires) then expires, warn = current, '' end
end

-- The newest token's hash is download_token_hash; the older ones still live are
-- in download_token_hashes (absent when there are none: the usual single link
-- costs one copy of its hash, not two).
local older = {}
local previous = redis.call('HGET', key, F.download_token_hash)
local kept = redis.call('HGET', key, F.download_token_hashes) or ''
if previous then kept = kept .. ' ' .. previous end
for old in string.gmatch(kept, '%S+') do
  if revoke == '1' then redis.call('HDEL', tokens, lookup_field(old)) else older[#older + 1] = old end
end
redis.call('HSET', tokens, lookup_field(hash), id)
redis.call('HSET', key, F.download_token_hash, hash, F.download_expires_at, expires)
if #older > 0 then
  redis.call('HSET', key, F.download_token_hashes, table.concat(older, ' '))
else
  redis.call('HDEL', key, F.download_token_hashes)
end
touch(key, id, status, now)
-- One deadline at a time: the warning, then (end_warning.lua) the expiry. Without a
-- warning to give, the expiry is armed now -- unless a warning is pending, which
-- arms it, from the expiry the job then holds, once given.
if warn ~= '' then
  redis.call('ZREM', deadline_set('expire'), id)
  redis.call('ZADD', deadline_set('warn'), warn, id)
elseif not redis.call('ZSCORE', deadline_set('warn'), id) then
  redis.call('ZADD', deadline_set('expire'), expires, id)
end
return {'applied', status, expires}
