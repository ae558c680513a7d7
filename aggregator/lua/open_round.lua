-- open_round.lua: open a new round if it is newer than the current one and the current one is closed.
-- KEYS[1] <p>round:current        string, newest round id
-- KEYS[2] <p>rounds               zset, every round id (score = id)
-- KEYS[3] <p>{r<new>}:round       hash of the new round
-- KEYS[4] <p>{r<new>}:sampled     set of the new round
-- KEYS[5] <p>{r<cur>}:round       hash of the current round (KEYS[3] again when there is none)
-- ARGV[1] the current round id the caller read ("" = none); a mismatch returns "stale" (caller retries)
-- ARGV[2] new round id   ARGV[3] opened_at   ARGV[4] deadline   ARGV[5] quorum   ARGV[6] policy (json)
-- ARGV[7..] sampled device ids (distinct)
-- Returns "opened" | "stale" | "not_newer" | "not_closed:<state>" | "exists".
-- KEYS[1], KEYS[2] and the two rounds sit in different hash slots: on Redis Cluster this one script
-- would have to become a WATCH/MULTI on round:current plus a per-round script.
local cur = redis.call('GET', KEYS[1])
if (cur or '') ~= ARGV[1] then return 'stale' end
if cur then
  if tonumber(ARGV[2]) <= tonumber(cur) then return 'not_newer' end
  local st = redis.call('HGET', KEYS[5], 'state')
  if st and st ~= 'closed' then return 'not_closed:' .. st end
end
if redis.call('EXISTS', KEYS[3]) == 1 then return 'exists' end
local n = #ARGV - 6
redis.call('HSET', KEYS[3], 'state', 'open', 'opened_at', ARGV[3], 'deadline', ARGV[4],
           'quorum', ARGV[5], 'sampled_count', n, 'policy', ARGV[6])
redis.call('DEL', KEYS[4])
for i = 7, #ARGV, 1000 do
  redis.call('SADD', KEYS[4], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[2])
return 'opened'
