-- Commit one flush of the asynchronous stream (aggregator/store_async.py), atomically, after its
-- merged masks were published: a crash before this publishes the same flush again (same version).
-- KEYS[1] state (hash)  KEYS[2] buffer (list)  KEYS[3] flushes (list of json records)
-- ARGV[1] the version the flush merged from  ARGV[2] buffered count  ARGV[3] the flush's json record
-- ARGV[4] flush records kept (the oldest beyond it are dropped)
-- Returns 1, or 0 when the version moved on (another flush committed first: nothing changes).
local version = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if version ~= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'version', version + 1, 'pending', 0)
redis.call('HINCRBY', KEYS[1], 'merged', tonumber(ARGV[2]))
redis.call('HINCRBY', KEYS[1], 'flushes', 1)
redis.call('DEL', KEYS[2])
redis.call('RPUSH', KEYS[3], ARGV[3])
if redis.call('LLEN', KEYS[3]) > tonumber(ARGV[4]) then
  redis.call('LPOP', KEYS[3])
end
return 1
