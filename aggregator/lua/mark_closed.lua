-- mark_closed.lua: closing -> closed, idempotently.
-- KEYS[1] <p>{r<r>}:round   hash
-- ARGV[1] now (unix seconds), written as closed_at on the transition only
-- Returns "closed" (moved now) | "already" (was closed: nothing changes) | "open" | "unknown_round".
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'unknown_round' end
if state == 'closed' then return 'already' end
if state ~= 'closing' then return state end
redis.call('HSET', KEYS[1], 'state', 'closed', 'closed_at', ARGV[1])
return 'closed'
