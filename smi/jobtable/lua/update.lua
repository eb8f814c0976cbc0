-- Set/clear whitelisted fields of an existing job, optionally only while its status
-- is one of `expect` and its fields hold `expect_fields` (compare-and-set), and
-- optionally set or clear deadlines.
-- ARGV: tag, job_id, now_ms, set (JSON object), clear (JSON list), expect (JSON list,
--       empty = any status), deadlines_set (JSON object), deadlines_clear (JSON list),
--       expect_fields (JSON object of field -> stored string, or null for "absent";
--       empty = no condition; optional)
-- Returns {outcome, status}; outcome is applied|rejected|missing.
local id, now = ARGV[2], ARGV[3]
local key = KEYS[1]
local status = redis.call('HGET', key, F.status)
if not status then return {'missing', ''} end
local expect = cjson.decode(ARGV[6])
if #expect > 0 then
  local ok = false
  for _, s in ipairs(expect) do if s == status then ok = true end end
  if not ok then return {'rejected', status} end
end
if ARGV[9] then
  -- Compared as the stored strings: the caller encodes its values as the table does.
  for field, wanted in pairs(cjson.decode(ARGV[9])) do
    local current = redis.call('HGET', key, field)
    if wanted == cjson.null then
      if current then return {'rejected', status} end
    elseif current ~= wanted then
      return {'rejected', status}
    end
  end
end
local set, clear = cjson.decode(ARGV[4]), cjson.decode(ARGV[5])
local before = revenue_before(key, touches_revenue(set, clear, status, status))
apply_fields(key, id, set, clear)
count_revenue(key, id, before)
touch(key, id, status, now)
apply_deadlines(id, cjson.decode(ARGV[7]), cjson.decode(ARGV[8]))
return {'applied', status}
