-- close_round.lua: elect the one closer of a round, and give it the round's close lease.
-- KEYS[1] <p>{r<r>}:round      hash (state, quorum, deadline)
-- KEYS[2] <p>{r<r>}:received   set
-- KEYS[3] <p>{r<r>}:closer     string: who is closing the round (expires: see store_closer.py)
-- ARGV[1] now (unix seconds)   ARGV[2] the caller's closer id   ARGV[3] lease in milliseconds
-- Moves state open -> closing (and records closing_at) only if |received| >= quorum and the round's
-- minimum wait (policy min_wait, seconds from opened_at; 0 if absent) has passed, or now >= deadline.
-- The minimum wait lets every board that answers within it into the round, so the fastest boards
-- alone cannot fill the quorum (the aggregator's ticker closes the round once the wait is over).
-- In the same step it sets KEYS[3] to the caller's id for the lease: another aggregator takes over the
-- close only once the lease has lapsed (its closer died), never while the winner is still at work.
-- Returns 1 to the caller that made that move, 0 to everyone else (not ready, already closing or
-- closed, unknown round). All keys share the round's hash tag.
if redis.call('HGET', KEYS[1], 'state') ~= 'open' then return 0 end
local quorum = tonumber(redis.call('HGET', KEYS[1], 'quorum'))
local deadline = tonumber(redis.call('HGET', KEYS[1], 'deadline'))
local now = tonumber(ARGV[1])
local min_wait = 0
local policy = redis.call('HGET', KEYS[1], 'policy')
if policy then
  local ok, decoded = pcall(cjson.decode, policy)
  if ok and type(decoded) == 'table' and tonumber(decoded['min_wait']) then min_wait = tonumber(decoded['min_wait']) end
end
local waited = now >= tonumber(redis.call('HGET', KEYS[1], 'opened_at') or '0') + min_wait
if (waited and redis.call('SCARD', KEYS[2]) >= quorum) or now >= deadline then
  redis.call('HSET', KEYS[1], 'state', 'closing', 'closing_at', ARGV[1])
  redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
