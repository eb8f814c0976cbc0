-- Create a job unless its request id (or job id) already made one.
-- ARGV: tag, job_id, request_id ('' = none), now_ms, actor, fields (JSON object of strings)
-- Returns {created (1|0), job_id, the job hash as HGETALL gives it}: the existing
-- job when the request was seen (so the caller needs no second round trip).
local id, request_id, now, actor = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local key = KEYS[1]
local requests = 'req:' .. TAG
if request_id ~= '' then
  local existing = redis.call('HGET', requests, lookup_field(request_id))
  if existing then
    local job = 'job:' .. TAG .. ':' .. existing
    local held = redis.call('HGET', job, F.request_id)
    -- The index is keyed by a digest: a job holding another request id is not this
    -- request's. A job deleted by hand returns nothing (the caller refuses).
    if not held or held == request_id then return {0, existing, redis.call('HGETALL', job)} end
  end
end
if redis.call('EXISTS', key) == 1 then return {0, id, redis.call('HGETALL', key)} end

-- A shard's first job starts its revenue figures, complete; a shard that has jobs
-- but no figures yet (a table older than them) gets them marked incomplete.
if redis.call('EXISTS', REVENUE) == 0 then
  local jobs = 0
  for _, s in ipairs(STATUSES) do jobs = jobs + redis.call('ZCARD', status_index(s, 'c')) end
  redis.call('HSET', REVENUE, 'complete', jobs == 0 and '1' or '0')
end

local fields = cjson.decode(ARGV[6])
local before = revenue_before(key, touches_revenue(fields, {}, 'new', 'new'))
apply_fields(key, id, fields, {})
-- The job id is the key's last part: the hash does not repeat it.
redis.call('HSET', key, F.status, 'new', F.created_at, now, F.attempts, '0')
count_revenue(key, id, before)
if request_id ~= '' then
  redis.call('HSET', key, F.request_id, request_id)
  redis.call('HSET', requests, lookup_field(request_id), id)
end
redis.call('ZADD', status_index('new', 'c'), 0, member(now, id))
touch(key, id, 'new', now)
append_history(key, now, now, '', 'new', actor, '')
return {1, id, redis.call('HGETALL', key)}
