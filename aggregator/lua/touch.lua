-- touch.lua: record a heartbeat of an enrolled device; heartbeats never move backwards.
-- KEYS[1] <p>device:<id>      hash (last_seen)
-- KEYS[2] <p>devices          set of ids
-- KEYS[3] <p>devices:alive    zset id -> last heartbeat
-- ARGV[1] id   ARGV[2] now
-- Returns 1, or 0 for a device that never said hello (nothing written).
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('ZADD', KEYS[3], 'GT', ARGV[2], ARGV[1])
local seen = redis.call('HGET', KEYS[1], 'last_seen')
if not seen or tonumber(ARGV[2]) > tonumber(seen) then redis.call('HSET', KEYS[1], 'last_seen', ARGV[2]) end
return 1
