-- Remove consumers from the group at once, and tell the others: the step that starts a takeover
-- without waiting for a heartbeat to expire.
--
-- KEYS[1]  consumers list
-- KEYS[2]  departures stream
-- ARGV[1]  heartbeat key prefix
-- ARGV[2]  a consumer id, or the prefix shared by every id of one process ("<host>-<pid>-<slot>-")
-- ARGV[3]  1 when ARGV[2] is a prefix, 0 when it is an exact id
-- ARGV[4]  why they left (logged by the others)
-- ARGV[5]  approximate MAXLEN of the departures stream
-- ARGV[6]  status hash key prefix
-- ARGV[7]  1 to step down rather than leave: the heartbeat key and the status hash stay, so
--          the consumer can still write what it holds (membership.lua no longer lists it
--          again), while the departure hands its share to the others at once
--
-- Returns the ids removed. Each removal deletes the heartbeat key and the status hash (which also fences any write
-- still in flight from that consumer: the write script checks it), drops the id from the list,
-- and appends {consumer_id, reason} to the departures stream, all in one step, so a consumer
-- that reads the departure already sees a view without that id. Heartbeat keys are built from
-- the ids here, as in membership.lua: one Redis instance, or one slot.

local prefix, match, is_prefix, reason = ARGV[1], ARGV[2], ARGV[3] == '1', ARGV[4]
local keep = ARGV[7] == '1'
local removed = {}
for _, id in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
    local hit
    if is_prefix then
        hit = string.sub(id, 1, #match) == match
    else
        hit = id == match
    end
    if hit then
        if not keep then
            redis.call('DEL', prefix .. id, ARGV[6] .. id)
        end
        redis.call('LREM', KEYS[1], 0, id)
        redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'consumer_id', id, 'reason', reason)
        removed[#removed + 1] = id
    end
end
if not is_prefix and not keep and #removed == 0 then
    -- Not listed (pruned already, or never listed): its heartbeat key may still be there.
    redis.call('DEL', prefix .. match, ARGV[6] .. match)
end
return removed
