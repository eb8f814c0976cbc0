-- Claim up to `limit` due members of one deadline set for `lease_ms`: their score
-- moves to now + lease, so a second janitor does not take them, and a janitor that
-- dies before finishing lets them come due again once the lease runs out.
-- KEYS[1]: the deadline set. ARGV: tag, now_ms, limit, lease_ms
-- Returns a flat list {member, due_ms, member, due_ms, ...}.
local now, limit, lease = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit)
for i = 1, #due, 2 do
  redis.call('ZADD', KEYS[1], 'XX', now + lease, due[i])
end
return due
