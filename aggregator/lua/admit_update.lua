-- admit_update.lua: persist one device's update for a round, at most once: as that round's own update
-- (mode "store"), or as a late update of an earlier round carried into it (mode "carry", the "carry"
-- late-update policy), or (mode "ingest") as "store" plus what the batch ingest path used to do in
-- further round trips: refuse a removed device, and mark the device reported, count the outcome and
-- keep the update's stats in the same atomic step. One body for all, so all decide duplicates and
-- closed rounds the same way.
-- KEYS[1] <p>{r<r>}:round          hash (state)
-- KEYS[2] <p>{r<r>}:sampled        set
-- KEYS[3] <p>{r<r>}:received       set (store)  |  <p>{r<r>}:carried set (carry): the set the device joins
-- KEYS[4] <p>{r<r>}:update:<id>    string, the raw encoded update (written once)
-- KEYS[5] <p>{r<r>}:arrivals       hash id -> arrival time (what `round watch` shows as latency)
-- Mode "ingest" only (aggregator/store_batch.py):
-- KEYS[6] <p>devices:removed   KEYS[7] <p>device:<id> hash (reported)   KEYS[8] <p>counters hash
-- KEYS[9] <p>{r<r>}:stats      KEYS[10] <p>{r<r>}:incoming:<id>:<nonce>, the body, SET (with an expiry)
--                              just before this script in the same pipeline: renamed into KEYS[4] if
--                              stored, else deleted. Passing 70 kB through ARGV into Lua and out again
--                              cost twice what a SET plus a RENAME cost (docs/results.md, issue 14).
-- ARGV[2] "" (the body is KEYS[10])   ARGV[5] round id   ARGV[6] stats json ("" when the update has none)
-- ARGV[1] device id   ARGV[2] body (bytes)   ARGV[3] now (unix seconds)   ARGV[4] mode: store|carry|ingest
-- Returns, checked in this order (shared/rounds.py admit_update is the simulator's copy of the store
-- mode; tests/membership_cases.py holds the table both are tested against):
--   "removed"        ingest: an operator removed the device (nothing is written)
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
-- In modes store and carry all keys share the round's hash tag, so they run unchanged on Redis Cluster;
-- mode ingest also names device keys (KEYS[6..8]), so it needs one Redis (or Sentinel's master).
local mode = ARGV[4]
if mode ~= 'store' and mode ~= 'carry' and mode ~= 'ingest' then
  return redis.error_reply('admit_update: mode must be store, carry or ingest')
end
local function admit(put)
  local state = redis.call('HGET', KEYS[1], 'state')
  if not state then return 'unknown_round' end
  local sampled = redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1
  if mode ~= 'carry' and not sampled then return 'not_sampled' end
  if mode == 'carry' and sampled then return 'sampled' end
  if redis.call('EXISTS', KEYS[4]) == 1 then return 'duplicate' end
  if state ~= 'open' then return 'closed' end
  put()
  redis.call('SADD', KEYS[3], ARGV[1])
  redis.call('HSET', KEYS[5], ARGV[1], ARGV[3])
  if mode == 'carry' then return 'carried' end
  return 'stored'
end
if mode ~= 'ingest' then return admit(function() redis.call('SET', KEYS[4], ARGV[2], 'NX') end) end
local status = 'removed'
if redis.call('SISMEMBER', KEYS[6], ARGV[1]) == 0 then
  -- KEYS[4] does not exist here (admit checked), so the RENAME cannot replace a stored update.
  status = admit(function() redis.call('RENAME', KEYS[10], KEYS[4]); redis.call('PERSIST', KEYS[4]) end)
end
if status ~= 'stored' then redis.call('DEL', KEYS[10]) end
-- The board is free again whatever became of its update (a duplicate too: an aggregator killed between
-- storing and noting left the device looking busy, and only the redelivery can clear that).
if status == 'stored' or status == 'duplicate' or status == 'closed' then
  redis.call('HSET', KEYS[7], 'reported', ARGV[5])
end
if status == 'stored' then
  redis.call('HINCRBY', KEYS[8], 'updates:stored', 1)
  if ARGV[6] ~= '' then redis.call('HSET', KEYS[9], ARGV[1], ARGV[6]) end
elseif status == 'duplicate' then
  redis.call('HINCRBY', KEYS[8], 'updates:duplicate', 1)
end
return status
