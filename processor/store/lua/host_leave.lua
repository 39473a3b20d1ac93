-- Deregister a host, but only the instance that registered it: a daemon refused its host id,
-- or one whose registration another daemon took over after it expired, must not remove the
-- live holder's.
--
-- KEYS[1]  hosts sorted set
-- KEYS[2]  host info hash
-- ARGV[1]  host id
-- ARGV[2]  this daemon's instance token
--
-- Returns 1 when the host was removed, 0 when the id is not ours (or not there).

local held = redis.call('HGET', KEYS[2], ARGV[1])
if not held then
    return 0
end
local ok, info = pcall(cjson.decode, held)
if not ok or type(info) ~= 'table' or info.instance ~= ARGV[2] then
    return 0
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
