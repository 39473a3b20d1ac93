-- Shared by dedup_append.lua and seen.lua: processor/store/scripts.py puts it where either says
-- "-- include: bucket.lua", so both find ids by the same rule. Defines functions only: nothing
-- runs until a script calls them.
--
-- The bucket is Redis's clock in bucket widths, but never earlier than the newest bucket
-- written (the bucket clock) while that is at most k + 1 buckets ahead: after Redis's clock
-- steps back (a failover to a replica whose clock is behind, an NTP step), writes go on into the
-- newest bucket, so the sets written before the step are still checked. A clock more than that
-- far ahead was wrong, not stepped back: it is dropped, and the bucket follows Redis's clock.

-- The current bucket, and the bucket clock as read (nil when unset).
local function current_bucket(clock_key, width, k)
    local time = redis.call('TIME')
    local bucket =
        math.floor((tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)) / width)
    local clock = tonumber(redis.call('GET', clock_key))
    if clock and clock > bucket and clock - bucket <= k + 1 then
        bucket = clock
    end
    return bucket, clock
end

-- Which of the digests ARGV[first .. last] the sets of the current bucket and the k before it
-- hold: seen[j] is true for the j-th digest found, and any_seen whether one was. One SMISMEMBER
-- per bucket, the digests straight from ARGV (unpack with a range). A set of another type fails
-- it before any write; the third value is then a WRONGTYPE error naming it (Redis's names no
-- key), found only then: no TYPE per bucket on every call.
local function seen_in_buckets(prefix, bucket, k, first, last)
    local seen, any_seen = {}, false
    for b = bucket - k, bucket do
        local key = prefix .. string.format('%.0f', b)
        local flags = redis.pcall('SMISMEMBER', key, unpack(ARGV, first, last))
        if flags['err'] then
            return nil, nil, 'WRONGTYPE ' .. key .. ' holds a ' .. redis.call('TYPE', key)['ok'] ..
                ' where the daemon keeps a set of written ids: delete or rename that key'
        end
        for j = 1, #flags do
            if flags[j] == 1 then
                seen[j], any_seen = true, true
            end
        end
    end
    return seen, any_seen, nil
end
