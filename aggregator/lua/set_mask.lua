-- set_mask.lua: store a device's merged mask only if its version is newer than the stored one.
-- KEYS[1] <p>device:<id>:mask           string, packed full merged mask
-- KEYS[2] <p>device:<id>:mask_version   int
-- ARGV[1] packed mask   ARGV[2] version
-- Returns 1 if written, 0 if the stored version is already >= ARGV[2] (a replay: nothing changes).
local cur = tonumber(redis.call('GET', KEYS[2]) or '0')
if tonumber(ARGV[2]) <= cur then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
return 1
