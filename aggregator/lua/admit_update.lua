-- admit_update.lua: persist one device's update for a round, at most once: as that round's own update
-- (mode "store"), or as a late update of an earlier round carried into it (mode "carry", the "carry"
-- late-update policy). One body for both, so both decide duplicates and closed rounds the same way.
-- KEYS[1] <p>{r<r>}:round          hash (state)
-- KEYS[2] <p>{r<r>}:sampled        set
-- KEYS[3] <p>{r<r>}:received       set (store)  |  <p>{r<r>}:carried set (carry): the set the device joins
-- KEYS[4] <p>{r<r>}:update:<id>    string, the raw encoded update (written once)
-- KEYS[5] <p>{r<r>}:arrivals       hash id -> arrival time (what `round watch` shows as latency)
-- ARGV[1] device id   ARGV[2] body (bytes)   ARGV[3] now (unix seconds)   ARGV[4] mode: "store" | "carry"
-- Returns, checked in this order (shared/rounds.py admit_update is the simulator's copy of the store
-- mode; tests/membership_cases.py holds the table both are tested against):
--   "unknown_round"  no such round
--   "not_sampled"    store: the device was not asked to train in this round
--   "sampled"        carry: the device was sampled in this round too, so its fresh update supersedes
--                    the late one (whether or not the fresh one has arrived yet)
--   "duplicate"      this device's update is already part of the round (a redelivery: nothing changes)
--   "closed"         the round is closing or closed (store: a late update; nothing is stored)
--   "stored" | "carried"  body written (SET NX), the device added to KEYS[3], its arrival recorded
-- Membership comes before "duplicate": an update the round's membership refuses is refused every time,
-- not acked once a different update of the device sits under the same key. "duplicate" comes before
-- "closed": a redelivery of a stored update after the round closed is still acked, not taken as late.
-- Carried updates are merged but do not count towards the quorum (close_round counts received only).
-- All keys share the round's hash tag, so this runs unchanged on Redis Cluster.
local mode = ARGV[4]
if mode ~= 'store' and mode ~= 'carry' then return redis.error_reply('admit_update: mode must be store or carry') end
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'unknown_round' end
local sampled = redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1
if mode == 'store' and not sampled then return 'not_sampled' end
if mode == 'carry' and sampled then return 'sampled' end
if redis.call('EXISTS', KEYS[4]) == 1 then return 'duplicate' end
if state ~= 'open' then return 'closed' end
redis.call('SET', KEYS[4], ARGV[2], 'NX')
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('HSET', KEYS[5], ARGV[1], ARGV[3])
if mode == 'store' then return 'stored' end
return 'carried'
