-- Which dedup ids are already written, without writing anything (before a takeover runs the
-- handler again for messages another consumer may have written).
--
-- KEYS[1]  the bucket clock (dedup_append.lua says how the bucket follows it)
-- ARGV[1]  seen-set key prefix, ARGV[2] bucket width in ms, ARGV[3] earlier buckets checked (k)
-- ARGV[4 .. 3+n]  the digests of the n ids
--
-- Returns one 0/1 per id, in order: the same rule as dedup_append.lua.

local prefix, width, k = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local n = #ARGV - 3
local result = {}
for j = 1, n do
    result[j] = 0
end
if n == 0 then
    return result
end
local time = redis.call('TIME')
local bucket = math.floor((tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)) / width)
local clock = tonumber(redis.call('GET', KEYS[1]))
if clock and clock > bucket and clock - bucket <= k + 1 then
    bucket = clock
end
for b = bucket - k, bucket do
    local flags = redis.call('SMISMEMBER', prefix .. string.format('%.0f', b), unpack(ARGV, 4, 3 + n))
    for j = 1, n do
        if flags[j] == 1 then
            result[j] = 1
        end
    end
end
return result
