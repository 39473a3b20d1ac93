-- Which dedup ids are already written, without writing anything (before a takeover runs the
-- handler again for messages another consumer may have written).
--
-- KEYS[1]  marker that lock keys of the previous write path may still exist
-- ARGV[1]  seen-set key prefix, ARGV[2] bucket width in ms, ARGV[3] earlier buckets checked (k),
-- ARGV[4]  key prefix of the previous write path's lock keys
-- ARGV[5..] two values per id: digest, dedup id
--
-- Returns one 0/1 per id, in order: the same rule as dedup_append.lua.

local prefix, width, k = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local time = redis.call('TIME')
local bucket = math.floor((tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)) / width)
local digests, result = {}, {}
for i = 5, #ARGV, 2 do
    digests[#digests + 1] = ARGV[i]
    result[#result + 1] = 0
end
if #digests == 0 then
    return result
end
for b = bucket - k, bucket do
    local flags = redis.call('SMISMEMBER', prefix .. string.format('%.0f', b), unpack(digests))
    for j = 1, #flags do
        if flags[j] == 1 then
            result[j] = 1
        end
    end
end
if redis.call('EXISTS', KEYS[1]) == 1 then
    local locks = {}
    for i = 5, #ARGV, 2 do
        locks[#locks + 1] = ARGV[4] .. ARGV[i + 1]
    end
    local values = redis.call('MGET', unpack(locks))
    for j = 1, #values do
        if values[j] then
            result[j] = 1
        end
    end
end
return result
