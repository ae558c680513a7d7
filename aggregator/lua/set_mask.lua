-- set_mask.lua: store a device's merged mask only if its version is newer than the stored one; the
-- mask it replaces is kept as the previous one (a delta-coded update names the version it is coded
-- against, and a redelivery after a close names the version before it: aggregator/core.py).
-- KEYS[1] <p>device:<id>:mask                packed full merged mask (or q4 levels)
-- KEYS[2] <p>device:<id>:mask_version        int
-- KEYS[3] <p>device:<id>:mask_prev           the mask KEYS[1] held before
-- KEYS[4] <p>device:<id>:mask_prev_version   its version
-- ARGV[1] packed mask   ARGV[2] version
-- Returns 1 if written, 0 if the stored version is already >= ARGV[2] (a replay: nothing changes).
local cur = tonumber(redis.call('GET', KEYS[2]) or '0')
if tonumber(ARGV[2]) <= cur then return 0 end
local old = redis.call('GET', KEYS[1])
if old then
  redis.call('SET', KEYS[3], old)
  redis.call('SET', KEYS[4], cur)
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
return 1
