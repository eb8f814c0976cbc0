-- Shared by every job-table script (prepended by smi/jobtable/scripts.py).
--
-- Every key a script touches carries the job's shard tag ARGV[1] (e.g. "{s3}"), so
-- a script runs in one Redis Cluster slot. KEYS[1] is always the job hash: it routes
-- the script to the right node; the other keys are derived from the tag here because
-- which index keys to touch depends on the job's current status, known only inside.

local TAG = ARGV[1]
local LOOKUPS = {
  stripe_checkout_session_id = 'cs',
  stripe_payment_intent_id = 'pi',
  upsampler_job_id = 'up',
  callback_token_hash = 'cb',
}

local function status_index(status, order)
  return 'st:' .. TAG .. ':' .. status .. ':' .. order
end

local function lookup_index(kind)
  return 'by:' .. TAG .. ':' .. kind
end

local function deadline_set(kind)
  return 'dl:' .. TAG .. ':' .. kind
end

-- Members of the status indexes sort lexicographically by (moment, job id): all
-- scores are 0, so ZRANGE BYLEX pages with a plain "last member seen" cursor and no
-- ties (job ids are unique). 13 digits of epoch milliseconds last until 2286.
local function member(ms, id)
  return string.rep('0', 13 - #ms) .. ms .. ':' .. id
end

-- Set and clear plain fields, keeping the lookup indexes (by:{tag}:<kind>) in step.
local function apply_fields(key, id, set, clear)
  local args = {}
  for field, value in pairs(set) do
    local kind = LOOKUPS[field]
    if kind then
      local old = redis.call('HGET', key, field)
      if old and old ~= value then redis.call('HDEL', lookup_index(kind), old) end
      redis.call('HSET', lookup_index(kind), value, id)
    end
    args[#args + 1] = field
    args[#args + 1] = value
  end
  if #args > 0 then redis.call('HSET', key, unpack(args)) end
  for _, field in ipairs(clear) do
    local kind = LOOKUPS[field]
    if kind then
      local old = redis.call('HGET', key, field)
      if old then redis.call('HDEL', lookup_index(kind), old) end
    end
    redis.call('HDEL', key, field)
  end
end

-- Move the job's "by updated_at" index member and stamp updated_at.
local function touch(key, id, status, now)
  local old = redis.call('HGET', key, 'updated_at')
  if old then redis.call('ZREM', status_index(status, 'u'), member(old, id)) end
  redis.call('ZADD', status_index(status, 'u'), 0, member(now, id))
  redis.call('HSET', key, 'updated_at', now)
end

local function apply_deadlines(id, set, clear)
  for _, kind in ipairs(clear) do redis.call('ZREM', deadline_set(kind), id) end
  for kind, due in pairs(set) do redis.call('ZADD', deadline_set(kind), due, id) end
end

-- The history is one field of the job hash, 'history': a line per status change,
-- "<ms> <from> <to> <by> <event id>\n" ('-' for no source or no event id). A field
-- costs a few bytes of overhead where a list key per job cost about 300 (key,
-- quicklist, JSON); event ids never hold whitespace (JobTable.transition checks).
local function append_history(key, now, from, to, by, event_id)
  local old = redis.call('HGET', key, 'history') or ''
  if from == '' then from = '-' end
  if event_id == '' then event_id = '-' end
  redis.call('HSET', key, 'history', old .. now .. ' ' .. from .. ' ' .. to .. ' ' .. by .. ' ' .. event_id .. '\n')
end
