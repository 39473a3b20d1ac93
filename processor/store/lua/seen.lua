-- Which dedup ids are already written, without writing anything (before a takeover runs the
-- handler again for messages another consumer may have written).
--
-- KEYS[1]  the bucket clock (bucket.lua says how the bucket follows it)
-- ARGV[1]  seen-set key prefix, ARGV[2] bucket width in ms, ARGV[3] earlier buckets checked (k)
-- ARGV[4 .. 3+n]  the digests of the n ids
--
-- Returns one 0/1 per id, in order: the same rule as dedup_append.lua, through the same
-- bucket.lua (included below), so the two cannot drift apart.
--
-- Per id this costs k + 1 set lookups: one SMISMEMBER per bucket for the whole call.

-- include: bucket.lua

local prefix, width, k = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local n = #ARGV - 3
local result = {}
if n == 0 then
    return result
end
local bucket = current_bucket(KEYS[1], width, k)
local seen, _, wrong = seen_in_buckets(prefix, bucket, k, 4, 3 + n)
if wrong then
    return redis.error_reply(wrong)
end
for j = 1, n do
    result[j] = seen[j] and 1 or 0
end
return result
