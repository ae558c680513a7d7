-- set_mask.lua: store a device's merged mask only if its version is newer than the stored one; the
-- mask it replaces is kept as the previous one (a delta-coded update names the version it is coded
-- against, and a redelivery after a close names the version before it: aggregator/core.py).
-- KEYS[1] <p>device:<id>:mask                packed full merged mask (or q4 levels)
-- KEYS[2] <p>device:<id>:mask_version        int
-- KEYS[3] <p>device:<id>:mask_prev           the mask KEYS[1] held before
-- KEYS[4] <p>device:<id>:mask_prev_version   its version
-- KEYS[5] <p>device:<id>:mask_incoming:<n>   the new mask, SET (with an expiry) just before this script
--                                            in the same pipeline; renamed into KEYS[1], or deleted
-- ARGV[1] version
-- Masks move by RENAME, never through Lua: a GET and two SETs of a 125 kB mask per device cost about a
-- millisecond of Redis time each, a second per close at 1,000 devices (docs/results.md, issue 14).
-- Returns 1 if written, 0 if the stored version is already >= ARGV[1] (a replay: nothing changes).
local cur = tonumber(redis.call('GET', KEYS[2]) or '0')
if tonumber(ARGV[1]) <= cur then
  redis.call('DEL', KEYS[5])
  return 0
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('RENAME', KEYS[1], KEYS[3])
  redis.call('SET', KEYS[4], cur)
end
redis.call('RENAME', KEYS[5], KEYS[1])
redis.call('PERSIST', KEYS[1])
redis.call('SET', KEYS[2], ARGV[1])
return 1
