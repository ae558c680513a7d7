-- carry_update.lua: carry a late update into the open round (the "carry" late-update policy).
-- KEYS[1] <p>{r<c>}:round          hash (state) of the round it is carried into
-- KEYS[2] <p>{r<c>}:sampled        set
-- KEYS[3] <p>{r<c>}:carried        set of devices whose late update joins this round's merge
-- KEYS[4] <p>{r<c>}:update:<id>    string, the raw encoded update (written once)
-- KEYS[5] <p>{r<c>}:arrivals       hash id -> arrival time
-- ARGV[1] device id   ARGV[2] body (bytes)   ARGV[3] now
-- Returns, checked in this order:
--   "unknown_round"  no such round
--   "duplicate"      an update of this device is already part of the round (redelivery: no change)
--   "sampled"        the device was sampled in this round too: its fresh update supersedes the late one
--   "closed"         this round is closing or closed as well
--   "carried"        body written and the device added to carried
-- Carried updates are merged but do not count towards the quorum, which is about the sampled devices.
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'unknown_round' end
if redis.call('EXISTS', KEYS[4]) == 1 then return 'duplicate' end
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then return 'sampled' end
if state ~= 'open' then return 'closed' end
redis.call('SET', KEYS[4], ARGV[2], 'NX')
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('HSET', KEYS[5], ARGV[1], ARGV[3])
return 'carried'
