-- Shared by every job-table script (prepended by smi/jobtable/scripts.py).
--
-- Every key a script touches carries the job's shard tag ARGV[1] (e.g. "{s3}"), so
-- a script runs in one Redis Cluster slot. KEYS[1] is always the job hash: it routes
-- the script to the right node; the other keys are derived from the tag here because
-- which index keys to touch depends on the job's current status, known only inside.

local TAG = ARGV[1]
-- Fields are stored under short codes (smi/jobtable/codec.py): F.<name> is the code.
-- LOOKUPS (field code -> index code) and TOKEN_LOOKUP come from smi/jobtable/keys.py
-- (scripts.lua_lookups), prepended with F.

local function status_index(status, order)
  return 'st:' .. TAG .. ':' .. status .. ':' .. order
end

local function lookup_index(kind)
  return 'by:' .. TAG .. ':' .. kind
end

-- A lookup files a value under the first LOOKUP_DIGITS hex digits of its SHA-1
-- (codec.lookup_field says why); readers check the job found holds the value.
local function lookup_field(value)
  return string.sub(redis.sha1hex(value), 1, LOOKUP_DIGITS)
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
      if old and old ~= value then redis.call('HDEL', lookup_index(kind), lookup_field(old)) end
      redis.call('HSET', lookup_index(kind), lookup_field(value), id)
    end
    args[#args + 1] = field
    args[#args + 1] = value
  end
  if #args > 0 then redis.call('HSET', key, unpack(args)) end
  for _, field in ipairs(clear) do
    local kind = LOOKUPS[field]
    if kind then
      local old = redis.call('HGET', key, field)
      if old then redis.call('HDEL', lookup_index(kind), lookup_field(old)) end
    end
    redis.call('HDEL', key, field)
  end
end

-- Move the job's "by updated_at" index member and stamp updated_at.
local function touch(key, id, status, now)
  local old = redis.call('HGET', key, F.updated_at)
  if old then redis.call('ZREM', status_index(status, 'u'), member(old, id)) end
  redis.call('ZADD', status_index(status, 'u'), 0, member(now, id))
  redis.call('HSET', key, F.updated_at, now)
end

local function apply_deadlines(id, set, clear)
  for _, kind in ipairs(clear) do redis.call('ZREM', deadline_set(kind), id) end
  for kind, due in pairs(set) do redis.call('ZADD', deadline_set(kind), due, id) end
end

-- The history is one field of the job hash, F.history: a line per status change,
-- "<ms> <from> <to> <by> <event id>\n" where <ms> counts from the job's created_at
-- (a few digits where the moment took 13), the statuses are as STATUS_CODE gives
-- them, the actor is its code and the event id is as the caller stored it ('-' for
-- no source or no event id; smi/jobtable/codec.py). A field costs a few bytes of
-- overhead where a list key per job cost about 300 (key, quicklist, JSON); event
-- ids never hold whitespace (JobTable.transition checks).
local function append_history(key, created, now, from, to, by, event_id)
  local old = redis.call('HGET', key, F.history) or ''
  local at = string.format('%d', tonumber(now) - tonumber(created))
  from = from == '' and '-' or STATUS_CODE[from]
  if event_id == '' then event_id = '-' end
  redis.call('HSET', key, F.history, old .. at .. ' ' .. from .. ' ' .. STATUS_CODE[to] .. ' ' .. by .. ' ' .. event_id .. '\n')
end

-- Running revenue figures, one hash per shard, 'rev:' .. TAG (smi/ops/revenue.py
-- sums the shards' hashes; its recount() over every job is the reference). A job
-- adds to its shard's figures, from its own fields:
--   charged, paid_jobs       price_cents and 1, once it has paid_at
--   cost                     cost_cents, while its status is completed
--   refunded, refunded_jobs  refund_amount_cents and 1, once it has that field
-- Every script that can change one of those fields reads the job's contribution
-- before and after its write and adds the differences (HINCRBY, integer cents), in
-- the same atomic script. Other fields of the hash: 'complete' = '1' while the
-- figures count every job of the shard (create.lua sets it on a shard's first job;
-- a table older than the figures lacks it until rebuild_revenue.lua has run), and,
-- while a rebuild runs, its cursor 'rebuild_at' and its own sums 'new:<figure>'.
local REVENUE = 'rev:' .. TAG
local FIGURES = {'charged', 'paid_jobs', 'cost', 'refunded', 'refunded_jobs'}
local REVENUE_FIELDS = {[F.status] = true, [F.paid_at] = true, [F.price_cents] = true, [F.cost_cents] = true,
                        [F.refund_amount_cents] = true}

local function contribution(key)
  local f = redis.call('HMGET', key, F.status, F.paid_at, F.price_cents, F.cost_cents, F.refund_amount_cents)
  local paid = f[2] and 1 or 0
  local refunded = f[5] and 1 or 0
  return {paid * (tonumber(f[3]) or 0), paid, f[1] == 'completed' and (tonumber(f[4]) or 0) or 0,
          refunded * (tonumber(f[5]) or 0), refunded}
end

-- Whether a write that sets `set`, clears `clear` and moves the status from `from`
-- to `to` can change the job's contribution (the figures read nothing else).
local function touches_revenue(set, clear, from, to)
  if from ~= to and (from == 'completed' or to == 'completed') then return true end
  for field in pairs(set) do if REVENUE_FIELDS[field] then return true end end
  for _, field in ipairs(clear) do if REVENUE_FIELDS[field] then return true end end
  return false
end

-- Byte order, as ZRANGEBYLEX sorts (Lua's '<' on strings follows the server's
-- locale, which Redis sets from the environment for SORT ALPHA).
local function lex_less(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end

-- The contribution before a write that `touches_revenue` (nil: nothing to count).
local function revenue_before(key, touched)
  if touched then return contribution(key) end
  return nil
end

-- After the write: add the differences to the shard's figures, and to a running
-- rebuild's sums when the rebuild has already counted this job (its created-order
-- member is at or before the rebuild's cursor; a member never changes).
local function count_revenue(key, id, before)
  if not before then return end
  local after = contribution(key)
  local counted_by_rebuild = nil
  for i, name in ipairs(FIGURES) do
    local delta = after[i] - before[i]
    if delta ~= 0 then
      if counted_by_rebuild == nil then
        local cursor = redis.call('HGET', REVENUE, 'rebuild_at')
        counted_by_rebuild = false
        if cursor then
          local m = member(redis.call('HGET', key, F.created_at) or '', id)
          counted_by_rebuild = not lex_less(cursor, m)
        end
      end
      delta = string.format('%d', delta)
      redis.call('HINCRBY', REVENUE, name, delta)
      if counted_by_rebuild then redis.call('HINCRBY', REVENUE, 'new:' .. name, delta) end
    end
  end
end
