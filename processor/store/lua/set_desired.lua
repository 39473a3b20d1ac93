-- Set the group's desired size, as one step against whatever else changes it.
--
-- KEYS[1]  control hash (desired, desired_by, desired_at_ms, cleared_by, autoscale)
-- KEYS[2]  stop key
-- ARGV[1]  mode: 'scale'   always (processor scale): also clears cleared_by and the stop key
--                'if'      only if desired still is ARGV[2] ('' for unset) and no clear is
--                          marked (the autoscaler: a `processor scale` or `--clear` made
--                          since its reading wins)
--                'restore' only if desired is unset and no clear is marked (a size Redis lost)
-- ARGV[2]  the desired size the caller read ('' for unset), for 'if'
-- ARGV[3]  the new size
-- ARGV[4]  desired_by
-- ARGV[5]  1 to start the autoscaler's cool-down now, 0 to leave it (desired_at_ms 0)
-- ARGV[6..] more field/value pairs to set (the autoscale decision)
--
-- Returns {applied (1/0), the previous desired size or ''}.

local mode, seen = ARGV[1], ARGV[2]
local previous = redis.call('HGET', KEYS[1], 'desired') or ''
local cleared = redis.call('HEXISTS', KEYS[1], 'cleared_by') == 1
if mode == 'if' and (previous ~= seen or cleared) then
    return {0, previous}
end
if mode == 'restore' and (previous ~= '' or cleared) then
    return {0, previous}
end
local at = 0
if ARGV[5] == '1' then
    local t = redis.call('TIME')
    at = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
redis.call('HSET', KEYS[1], 'desired', ARGV[3], 'desired_by', ARGV[4], 'desired_at_ms', at)
for i = 6, #ARGV, 2 do
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
if mode == 'scale' then
    redis.call('HDEL', KEYS[1], 'cleared_by')
    redis.call('DEL', KEYS[2])
end
return {1, previous}
