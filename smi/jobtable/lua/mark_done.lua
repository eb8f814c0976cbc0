-- Record that a side effect happened: field DONE .. '<step>' of the job hash (a field
-- costs a few bytes; the set per job it replaces cost about 230). Nothing is
-- written for a job that does not exist: a lone field would make a broken record.
-- ARGV: tag, job_id, step
-- Returns 1 if this call recorded the step, 0 if it was recorded before, -1 missing.
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
return redis.call('HSETNX', KEYS[1], DONE .. ARGV[3], '1')
