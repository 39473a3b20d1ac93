-- Heartbeat and prune in one step: refresh this consumer's heartbeat and its status hash, drop
-- dead ids from the consumers list, and return the live members.
--
-- KEYS[1]  consumers list
-- KEYS[2]  this consumer's status hash (ignored when ARGV[2] is "")
-- ARGV[1]  heartbeat key prefix
-- ARGV[2]  this consumer's id, or "" to only prune and read (the supervisor's monitor)
-- ARGV[3]  heartbeat TTL in ms
-- ARGV[4]  status hash key prefix (the hashes of pruned ids are deleted with them)
-- ARGV[5]  1 to list this consumer again when it is live but missing from the list (deleted or
--          overwritten under the group); 0 once it has stepped down (leave.lua): it still
--          beats, so its last writes are not fenced, while the others own its share
-- ARGV[6..] field, value pairs written to KEYS[2] when the heartbeat was refreshed
--
-- Returns {refreshed, id1, value1, id2, value2, ...}: refreshed is 1 when this consumer's
-- heartbeat was still alive and has been extended, 0 when it had expired (the group declared it
-- dead, so it must rejoin under a new id) or when ARGV[2] is "". The values are the heartbeat
-- contents, "<token>:<registered at, ms>".
--
-- The heartbeat is extended with PEXPIRE, never recreated, so an expired consumer cannot quietly come back: the
-- others may already have taken over its share. Ids are removed only when their heartbeat key is
-- gone, so a daemon never removes a live consumer it does not own. Heartbeat keys are built
-- from the ids here: on Redis Cluster they share the group's hash tag with KEYS (keys.py).

local prefix, me, ttl, info_prefix, relist = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5] == '1'
local refreshed = 0
if me ~= '' then
    refreshed = redis.call('PEXPIRE', prefix .. me, ttl)
    if refreshed == 1 and #ARGV > 5 then
        redis.call('HSET', KEYS[2], unpack(ARGV, 6))
        redis.call('PEXPIRE', KEYS[2], ttl)
    end
end
local result, listed = {refreshed}, false
for _, id in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
    local value = redis.call('GET', prefix .. id)
    if value then
        result[#result + 1] = id
        result[#result + 1] = value
        listed = listed or id == me
    else
        redis.call('LREM', KEYS[1], 0, id)
        redis.call('DEL', info_prefix .. id)
    end
end
if refreshed == 1 and relist and not listed then
    -- Alive but not listed: the list was deleted or overwritten under us. Listing ourselves
    -- again keeps every live consumer in every view (a view without them gives their share to
    -- no one).
    redis.call('RPUSH', KEYS[1], me)
    result[#result + 1] = me
    result[#result + 1] = redis.call('GET', prefix .. me)
end
return result
