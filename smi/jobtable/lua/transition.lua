-- The one atomic status change: compare the current status against the allowed
-- sources, apply fields, move the indexes, update deadline sets, append history
-- and record the event id -- or change nothing at all.
-- ARGV: tag, job_id, target, sources (JSON list), actor, event_id, now_ms,
--       set (JSON object), clear (JSON list), deadlines_set (JSON object kind->ms),
--       deadlines_clear (JSON list)
-- Returns {outcome, previous status}; outcome is applied|duplicate|noop|rejected|missing.
local id, target, actor, event_id, now = ARGV[2], ARGV[3], ARGV[5], ARGV[6], ARGV[7]
local key = KEYS[1]

local status = redis.call('HGET', key, F.status)
if not status then return {'missing', ''} end

-- Redelivery: this exact event was applied before. The history is short (a handful
-- of lines), so a search costs less than a separate set of event ids per job; the
-- event id ends its line.
if event_id ~= '' then
  local history = redis.call('HGET', key, F.history) or ''
  if string.find(history, ' ' .. event_id .. '\n', 1, true) then return {'duplicate', status} end
end
if status == target then return {'noop', status} end

local allowed = false
for _, source in ipairs(cjson.decode(ARGV[4])) do
  if source == status then allowed = true end
end
if not allowed then return {'rejected', status} end

local set, clear = cjson.decode(ARGV[8]), cjson.decode(ARGV[9])
local before = revenue_before(key, touches_revenue(set, clear, status, target))
apply_fields(key, id, set, clear)
local created = redis.call('HGET', key, F.created_at)
local updated = redis.call('HGET', key, F.updated_at)
redis.call('ZREM', status_index(status, 'c'), member(created, id))
redis.call('ZREM', status_index(status, 'u'), member(updated, id))
redis.call('ZADD', status_index(target, 'c'), 0, member(created, id))
redis.call('ZADD', status_index(target, 'u'), 0, member(now, id))
redis.call('HSET', key, F.status, target, F.updated_at, now)
apply_deadlines(id, cjson.decode(ARGV[10]), cjson.decode(ARGV[11]))
append_history(key, created, now, status, target, actor, event_id)
count_revenue(key, id, before)
return {'applied', status}
