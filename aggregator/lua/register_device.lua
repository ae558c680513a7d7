-- register_device.lua: enrol a device (a hello); idempotent.
-- KEYS[1] <p>device:<id>             hash: profile, fingerprint, enrolled_at, last_seen
-- KEYS[2] <p>device:<id>:structure   string, packed structure S_i (never changes)
-- KEYS[3] <p>devices                 set of ids
-- KEYS[4] <p>devices:alive           zset id -> last heartbeat
-- ARGV[1] id   ARGV[2] profile   ARGV[3] fingerprint   ARGV[4] structure   ARGV[5] now
-- Returns "registered" (new), "again" (same structure: profile, fingerprint, last_seen refreshed),
-- or "structure_changed" (nothing written).
local old = redis.call('GET', KEYS[2])
if old and old ~= ARGV[4] then return 'structure_changed' end
redis.call('SET', KEYS[2], ARGV[4])
redis.call('HSET', KEYS[1], 'profile', ARGV[2], 'fingerprint', ARGV[3])
redis.call('HSETNX', KEYS[1], 'enrolled_at', ARGV[5])
local seen = redis.call('HGET', KEYS[1], 'last_seen')
if not seen or tonumber(ARGV[5]) > tonumber(seen) then redis.call('HSET', KEYS[1], 'last_seen', ARGV[5]) end
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[4], 'GT', ARGV[5], ARGV[1])
if old then return 'again' end
return 'registered'
