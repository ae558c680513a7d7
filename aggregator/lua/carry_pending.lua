-- carry_pending.lua: move a device's parked late update into an open round, in one step: the
-- update is merged into the round (or judged too stale, or superseded) and un-parked together, so a
-- crash can neither lose a parked update nor carry it twice.
-- KEYS[1] <p>pending:<id>            hash: round, body
-- KEYS[2] <p>pending                 set of devices with a parked update
-- KEYS[3] <p>{r<r>}:round            hash (state)
-- KEYS[4] <p>{r<r>}:sampled          set
-- KEYS[5] <p>{r<r>}:carried          set
-- KEYS[6] <p>{r<r>}:update:<id>      string
-- KEYS[7] <p>{r<r>}:arrivals         hash
-- ARGV[1] device id   ARGV[2] round r (the round it goes into)   ARGV[3] max staleness   ARGV[4] now
-- Returns {status, parked round}; status:
--   "none"       nothing parked for the device (the set said so: it is tidied)
--   "stale"      r - parked round > max staleness: un-parked, not merged
--   "carried" | "duplicate" | "sampled" | "closed" | "unknown_round"  as admit_update.lua's carry mode
--                (same checks, same order); only "carried" writes into the round
-- Whatever the status, the parked update is gone afterwards: only "carried" or "duplicate" put it
-- into a round (the caller counts late:carried), any other is counted late:expired, as before this
-- script existed (the semantics tests/integration/test_late_policy.py pins).
-- The pending keys and the round's keys sit in different hash slots (as open_round.lua's do).
local parked = redis.call('HMGET', KEYS[1], 'round', 'body')
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
if not parked[1] or not parked[2] then return {'none', '-1'} end
local late_round = parked[1]
if tonumber(ARGV[2]) - tonumber(late_round) > tonumber(ARGV[3]) then return {'stale', late_round} end
local state = redis.call('HGET', KEYS[3], 'state')
if not state then return {'unknown_round', late_round} end
if redis.call('SISMEMBER', KEYS[4], ARGV[1]) == 1 then return {'sampled', late_round} end
if redis.call('EXISTS', KEYS[6]) == 1 then return {'duplicate', late_round} end
if state ~= 'open' then return {'closed', late_round} end
redis.call('SET', KEYS[6], parked[2], 'NX')
redis.call('SADD', KEYS[5], ARGV[1])
redis.call('HSET', KEYS[7], ARGV[1], ARGV[4])
return {'carried', late_round}
