-- Commit one flush of the asynchronous stream (aggregator/store_async.py), atomically, after its
-- merged masks were published: a crash before this publishes the same flush again (same version).
-- KEYS[1] state (hash)  KEYS[2] buffer (list)  KEYS[3] flushes (list of json records)
-- KEYS[4] latest (hash device -> body)  KEYS[5] base (hash device -> base)
-- ARGV[1] the version the flush merged from  ARGV[2] merged count  ARGV[3] the flush's json record
-- ARGV[4] flush records kept (the oldest beyond it are dropped)  ARGV[5] buffered updates dropped (their
-- boards removed)  ARGV[6..] the removed boards the flush forgets: their latest update votes no more
-- Returns 1, or 0 when the version moved on (another flush committed first: nothing changes).
local version = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if version ~= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'version', version + 1, 'pending', 0)
redis.call('HINCRBY', KEYS[1], 'merged', tonumber(ARGV[2]))
redis.call('HINCRBY', KEYS[1], 'flushes', 1)
if tonumber(ARGV[5]) > 0 then
  redis.call('HINCRBY', KEYS[1], 'dropped_removed', tonumber(ARGV[5]))
end
for i = 6, #ARGV do
  redis.call('HDEL', KEYS[4], ARGV[i])
  redis.call('HDEL', KEYS[5], ARGV[i])
end
redis.call('DEL', KEYS[2])
redis.call('RPUSH', KEYS[3], ARGV[3])
if redis.call('LLEN', KEYS[3]) > tonumber(ARGV[4]) then
  redis.call('LPOP', KEYS[3])
end
return 1
