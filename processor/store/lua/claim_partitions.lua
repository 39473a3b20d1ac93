-- Record the group's partition count, or check it: daemons with different PARTITIONS would
-- write one message under two layouts (two dedup sets), so a mismatch is refused while any
-- host of the group is live; with none live, the new count replaces the old one.
--
-- KEYS[1]  control hash (field 'partitions')
-- KEYS[2]  hosts zset (host id -> expiry, ms on Redis's clock)
-- ARGV[1]  this daemon's PARTITIONS
--
-- Returns {accepted (1/0), the count recorded before, or ''}.

local before = redis.call('HGET', KEYS[1], 'partitions') or ''
if before == ARGV[1] then
    return {1, before}
end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
if before ~= '' and redis.call('ZCOUNT', KEYS[2], string.format('%.0f', now), '+inf') > 0 then
    return {0, before}
end
redis.call('HSET', KEYS[1], 'partitions', ARGV[1])
return {1, before}
