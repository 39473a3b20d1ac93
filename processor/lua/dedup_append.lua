-- Deduplicate and append a batch, atomically: the only place messages enter the output streams.
--
-- KEYS[1]  output stream
-- KEYS[2]  dead-letter stream
-- KEYS[3]  stats hash (group counters: written, dead, skipped)
-- KEYS[4]  heartbeat key of the writing consumer (its fence)
-- KEYS[5]  marker that lock keys of the previous write path may still exist (see below)
-- ARGV[1]  seen-set key prefix: the set of time bucket b is ARGV[1] .. b
-- ARGV[2]  bucket width in ms
-- ARGV[3]  how many earlier buckets are checked besides the current one (k)
-- ARGV[4]  consumer id written into every entry
-- ARGV[5]  fence token: the value KEYS[4] must hold, or "" to skip the check
-- ARGV[6]  approximate MAXLEN of both streams (XADD MAXLEN ~), or 0 to keep everything
-- ARGV[7]  key prefix of the previous write path's lock keys
-- ARGV[8..] five values per entry: kind ("o" output, "d" dead letter), digest (a fixed-size
--           digest of the dedup id), dedup id, a, b
--           output:      a = data (processed message as JSON), b unused; message_id = dedup id
--           dead letter: a = reason, b = raw payload
--
-- Returns {written, dead, skipped, dead_flags}, or {-1, 0, 0, ""} when the fence token does not
-- match. dead_flags has one character per dead-letter entry, in order: "1" appended, "0" seen.
--
-- An id is remembered by its digest in the set of the time bucket (Redis's clock) it was
-- written in; a batch checks the current bucket and the k before it, with one SMISMEMBER each,
-- so an id is remembered for between k and k + 1 bucket widths; the set of the bucket before
-- those is unlinked. The check, the appends and the
-- SADD of the new digests are one script, so no id is remembered without being written, and a
-- retried batch skips what the first attempt wrote. While KEYS[5] exists (set at start-up when
-- lock keys of the previous write path were found; it expires when they have), their locks
-- count as seen too, so an upgrade in place writes nothing twice.

if ARGV[5] ~= '' and redis.call('GET', KEYS[4]) ~= ARGV[5] then
    return {-1, 0, 0, ''}
end

local prefix, width, k = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local consumer, maxlen = ARGV[4], tonumber(ARGV[6])
local time = redis.call('TIME')
local bucket = math.floor((tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)) / width)

local digests = {}
for i = 8, #ARGV, 5 do
    digests[#digests + 1] = ARGV[i + 1]
end
if #digests == 0 then
    return {0, 0, 0, ''}
end

local seen = {}
for b = bucket - k, bucket do
    local flags = redis.call('SMISMEMBER', prefix .. string.format('%.0f', b), unpack(digests))
    for j = 1, #flags do
        if flags[j] == 1 then
            seen[j] = true
        end
    end
end
if redis.call('EXISTS', KEYS[5]) == 1 then
    local locks = {}
    for i = 8, #ARGV, 5 do
        locks[#locks + 1] = ARGV[7] .. ARGV[i + 2]
    end
    local values = redis.call('MGET', unpack(locks))
    for j = 1, #values do
        if values[j] then
            seen[j] = true
        end
    end
end

local function append(stream, ...)
    if maxlen > 0 then
        return redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', ...)
    end
    return redis.call('XADD', stream, '*', ...)
end

local written, dead, skipped = 0, 0, 0
local dead_flags, new, in_batch = {}, {}, {}
local j = 0
for i = 8, #ARGV, 5 do
    j = j + 1
    local digest = ARGV[i + 1]
    local fresh = not seen[j] and not in_batch[digest]
    if fresh then
        in_batch[digest] = true
        new[#new + 1] = digest
    end
    if ARGV[i] == 'o' then
        if fresh then
            append(KEYS[1], 'message_id', ARGV[i + 2], 'consumer_id', consumer, 'data', ARGV[i + 3])
            written = written + 1
        else
            skipped = skipped + 1
        end
    elseif fresh then
        append(KEYS[2], 'reason', ARGV[i + 3], 'raw', ARGV[i + 4], 'consumer_id', consumer)
        dead = dead + 1
        dead_flags[#dead_flags + 1] = '1'
    else
        skipped = skipped + 1
        dead_flags[#dead_flags + 1] = '0'
    end
end
if #new > 0 then
    local key = prefix .. string.format('%.0f', bucket)
    redis.call('SADD', key, unpack(new))
    -- Checked by the k buckets after it. The first write of a later bucket UNLINKs it (freed off
    -- the main thread: a set can hold millions of digests); the expiry is the backstop.
    redis.call('PEXPIREAT', key, string.format('%.0f', (bucket + k + 2) * width))
end
redis.call('UNLINK', prefix .. string.format('%.0f', bucket - k - 1))
if written > 0 then redis.call('HINCRBY', KEYS[3], 'written', written) end
if dead > 0 then redis.call('HINCRBY', KEYS[3], 'dead', dead) end
if skipped > 0 then redis.call('HINCRBY', KEYS[3], 'skipped', skipped) end
return {written, dead, skipped, table.concat(dead_flags)}
