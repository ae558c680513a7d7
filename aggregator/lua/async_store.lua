-- Store one update of the asynchronous stream (aggregator/store_async.py), atomically.
-- KEYS[1] done (hash device -> highest task stored)   KEYS[2] latest (hash device -> body)
-- KEYS[3] base (hash device -> base)   KEYS[4] buffer (list of devices)   KEYS[5] state (hash: version, pending)
-- KEYS[6] order (list of update ids)   KEYS[7] log (hash id -> body)
-- ARGV[1] device  ARGV[2] update id  ARGV[3] body  ARGV[4] base version  ARGV[5] task number
-- ARGV[6] replay log bound (updates kept in order/log; 0: no log)
-- Returns {status, pending}: status stored | replaced | duplicate | future_base.
-- A board's task n+1 is only sent once its update for task n is stored, so the tasks stored per board
-- are 1..highest: "task <= highest" is exactly "this id was stored", in one field per board (a set of
-- every id ever stored would grow with the stream).
local top = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[5]) <= top then
  return {'duplicate', tonumber(redis.call('HGET', KEYS[5], 'pending') or '0')}
end
local version = tonumber(redis.call('HGET', KEYS[5], 'version') or '0')
if tonumber(ARGV[4]) > version then
  return {'future_base', 0}
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[5])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
local keep = tonumber(ARGV[6])
if keep > 0 then
  redis.call('RPUSH', KEYS[6], ARGV[2])
  redis.call('HSET', KEYS[7], ARGV[2], ARGV[3])
  if redis.call('LLEN', KEYS[6]) > keep then
    redis.call('HDEL', KEYS[7], redis.call('LPOP', KEYS[6]))
  end
end
local pending = redis.call('HINCRBY', KEYS[5], 'pending', 1)
redis.call('HINCRBY', KEYS[5], 'stored', 1)
if redis.call('LPOS', KEYS[4], ARGV[1]) then
  redis.call('HINCRBY', KEYS[5], 'replaced', 1)
  return {'replaced', pending}
end
redis.call('RPUSH', KEYS[4], ARGV[1])
return {'stored', pending}
