-- store_update.lua: persist one device's update for a round, at most once.
-- KEYS[1] <p>{r<r>}:round          hash (state)
-- KEYS[2] <p>{r<r>}:sampled        set
-- KEYS[3] <p>{r<r>}:received       set
-- KEYS[4] <p>{r<r>}:update:<id>    string, the raw encoded update (written once)
-- KEYS[5] <p>{r<r>}:arrivals       hash id -> arrival time (what `round watch` shows as latency)
-- ARGV[1] device id   ARGV[2] body (bytes)   ARGV[3] now (unix seconds)
-- Returns, checked in this order:
--   "unknown_round"  no such round
--   "duplicate"      this device's update is already stored (a redelivery: nothing changes)
--   "not_sampled"    the device was not asked to train in this round
--   "closed"         the round is closing or closed (a late update; nothing is stored)
--   "stored"         body written (SET NX) and the device added to received
-- All keys share the round's hash tag, so this runs unchanged on Redis Cluster.
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'unknown_round' end
if redis.call('EXISTS', KEYS[4]) == 1 then return 'duplicate' end
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 0 then return 'not_sampled' end
if state ~= 'open' then return 'closed' end
redis.call('SET', KEYS[4], ARGV[2], 'NX')
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('HSET', KEYS[5], ARGV[1], ARGV[3])
return 'stored'
