-- Recount one shard's revenue figures from its jobs, a chunk of jobs per call, while
-- the stages go on writing (`smi revenue --rebuild`): for a table older than the
-- figures, or figures a recount found wrong. Jobs are visited in created order (the
-- members of the status indexes, which a job keeps across statuses) after the cursor
-- 'rebuild_at'; their contributions go to the sums 'new:<figure>'. A write to a job
-- at or before the cursor adds its difference to those sums too (count_revenue), so
-- they always equal the figures of the jobs up to the cursor; once the cursor has
-- passed every job they become the shard's figures, marked complete.
-- KEYS[1]: the shard's revenue hash. ARGV: tag, limit, restart ('1' = from the start)
-- Returns {done (1|0), jobs counted by this call}.
local limit = tonumber(ARGV[2])
local cursor = redis.call('HGET', REVENUE, 'rebuild_at')
if ARGV[3] == '1' or not cursor then
  cursor = ''
  local args = {'rebuild_at', ''}
  for _, name in ipairs(FIGURES) do
    args[#args + 1] = 'new:' .. name
    args[#args + 1] = '0'
  end
  redis.call('HSET', REVENUE, unpack(args))
end

local found = {}
local start = cursor == '' and '-' or '(' .. cursor
for _, s in ipairs(STATUSES) do
  for _, m in ipairs(redis.call('ZRANGEBYLEX', status_index(s, 'c'), start, '+', 'LIMIT', 0, limit)) do
    found[#found + 1] = m
  end
end
table.sort(found, lex_less)

local taken = math.min(#found, limit)
local sums = {0, 0, 0, 0, 0}
for i = 1, taken do
  local id = string.sub(found[i], string.find(found[i], ':', 1, true) + 1)
  local c = contribution('job:' .. TAG .. ':' .. id)
  for j = 1, #FIGURES do sums[j] = sums[j] + c[j] end
end
for j, name in ipairs(FIGURES) do
  if sums[j] ~= 0 then redis.call('HINCRBY', REVENUE, 'new:' .. name, string.format('%d', sums[j])) end
end

if #found < limit then  -- every status index ran out: each job of the shard is counted
  local fresh = {}
  for _, name in ipairs(FIGURES) do fresh[#fresh + 1] = 'new:' .. name end
  local values = redis.call('HMGET', REVENUE, unpack(fresh))
  local args = {'complete', '1'}
  for j, name in ipairs(FIGURES) do
    args[#args + 1] = name
    args[#args + 1] = values[j]
  end
  redis.call('HSET', REVENUE, unpack(args))
  redis.call('HDEL', REVENUE, 'rebuild_at', unpack(fresh))
  return {1, taken}
end
redis.call('HSET', REVENUE, 'rebuild_at', found[taken])
return {0, taken}
