-- park_update.lua: park a late update until the next round opens (the "carry" late-update policy).
-- KEYS[1] <p>pending:<id>   hash: round, body
-- KEYS[2] <p>pending        set of devices with a parked update
-- ARGV[1] device id   ARGV[2] the late update's round   ARGV[3] body (bytes)
-- A device has at most one parked update, its newest. Returns:
--   "parked"      nothing was parked for the device: this one is
--   "replaced"    an older parked update was replaced by this one (the caller counts late:replaced)
--   "duplicate"   this round's update is parked already (a redelivery: nothing changes)
--   "superseded"  a newer update is parked already: this one is not kept (the caller counts it)
-- One script, so two aggregators parking the same device's updates cannot both think they won.
local old = redis.call('HGET', KEYS[1], 'round')
if old then
  local o, r = tonumber(old), tonumber(ARGV[2])
  if o == r then return 'duplicate' end
  if o > r then return 'superseded' end
end
redis.call('HSET', KEYS[1], 'round', ARGV[2], 'body', ARGV[3])
redis.call('SADD', KEYS[2], ARGV[1])
if old then return 'replaced' end
return 'parked'
