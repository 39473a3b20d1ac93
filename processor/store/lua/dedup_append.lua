-- Deduplicate and append a batch, atomically: the only place messages enter the output streams.
--
-- KEYS[1]  output stream
-- KEYS[2]  dead-letter stream
-- KEYS[3]  stats hash (group counters: written, dead, skipped)
-- KEYS[4]  heartbeat key of the writing consumer (its fence)
-- KEYS[5]  the bucket clock: the newest bucket written (see bucket.lua)
-- ARGV[1]  seen-set key prefix: the set of time bucket b is ARGV[1] .. b
-- ARGV[2]  bucket width in ms
-- ARGV[3]  how many earlier buckets are checked besides the current one (k)
-- ARGV[4]  consumer id written into every entry
-- ARGV[5]  fence token: the value KEYS[4] must hold, or "" to skip the check
-- ARGV[6]  approximate MAXLEN of both streams (XADD MAXLEN ~), or 0 to keep everything
-- ARGV[7]  n: output entries; ARGV[8] m: dead letters (dedup ids all different: the caller
--          counts repeats inside the batch as skipped); ARGV[9] those repeats, added to skipped
-- ARGV[10 .. 9+n+m]  the digests (fixed size) of the dedup ids: outputs, then dead letters
-- then n pairs (message_id, data as JSON), then m quintuples (message_id or "" when the message
--          had none, reason code, reason, raw payload, time as UTC ISO-8601)
--
-- Returns {written, dead, skipped, dead_flags}, or {-1, 0, 0, ""} when the fence token does not
-- match, or a WRONGTYPE error naming the key, before any write, when KEYS[1], KEYS[2] or KEYS[3]
-- holds another type. dead_flags has one character per dead letter, in order: "1" appended, "0" seen.
--
-- An id is remembered by its digest in the set of the time bucket (Redis's clock) it was
-- written in; a batch checks the current bucket and the k before it, with one SMISMEMBER each,
-- so an id is remembered for between k and k + 1 bucket widths; the set of the bucket before
-- those is unlinked. The check, the appends and the SADD of the new digests are one script, so
-- no id is remembered without being written, and a retried batch skips what the first attempt
-- wrote.
--
-- How the current bucket follows Redis's clock and the bucket clock (KEYS[5]), and the
-- SMISMEMBER of each bucket checked, are bucket.lua's: included below, shared with seen.lua.
--
-- Per message this costs one XADD, k + 1 set lookups and one set insert: the digests go to
-- SMISMEMBER and SADD straight from ARGV (unpack with a range), with no table built per batch
-- unless something was already seen.

-- include: bucket.lua

if ARGV[5] ~= '' and redis.call('GET', KEYS[4]) ~= ARGV[5] then
    return {-1, 0, 0, ''}
end

local prefix, width, k = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local consumer, maxlen = ARGV[4], tonumber(ARGV[6])
local outputs, deads = tonumber(ARGV[7]), tonumber(ARGV[8])
local written, dead, skipped = 0, 0, tonumber(ARGV[9])
local first, last = 10, 9 + outputs + deads
if last < first then
    return {0, 0, 0, ''} -- an empty batch (a repeat's first occurrence is always in its call)
end
-- Someone else's key under one of our names would fail an XADD or HINCRBY halfway through the
-- batch, after earlier appends and before the SADD that remembers them: a retry would write
-- those again. So the keys written after the first append are checked first (a set of the
-- wrong type fails at SMISMEMBER, before any write), and the reply names the key.
for i, kind in ipairs({'stream', 'stream', 'hash'}) do
    local found = redis.call('TYPE', KEYS[i])['ok']
    if found ~= kind and found ~= 'none' then
        return redis.error_reply('WRONGTYPE ' .. KEYS[i] .. ' holds a ' .. found ..
            ' where the daemon writes a ' .. kind .. ': delete or rename that key')
    end
end
-- So is a counter that holds no integer, or one HINCRBY would overflow (an operator's HSET).
local counters = {'written', 'dead', 'skipped'}
local held = redis.call('HMGET', KEYS[3], unpack(counters))
for i, name in ipairs(counters) do
    local value = held[i]
    -- As HINCRBY reads one: no sign but a minus, no leading zero, no "-0"; with room to grow.
    local integer = value == '0' or string.match(value or '', '^%-?[1-9]%d*$')
    if value and not (integer and string.len(value) < 19) then
        return redis.error_reply('WRONGTYPE ' .. KEYS[3] .. ' field ' .. name .. ' holds ' ..
            string.sub(value, 1, 40) .. ' where the daemon counts an integer: delete that field')
    end
end
local bucket, clock = current_bucket(KEYS[5], width, k)
local seen, any_seen, wrong = seen_in_buckets(prefix, bucket, k, first, last)
if wrong then
    return redis.error_reply(wrong)
end

-- The outputs' XADD spelled out (no table of fields): they are the hot path.
local output, at = KEYS[1], last + 1
for j = 1, outputs do
    if seen[j] then
        skipped = skipped + 1
    else
        if maxlen > 0 then
            redis.call('XADD', output, 'MAXLEN', '~', maxlen, '*',
                'message_id', ARGV[at], 'consumer_id', consumer, 'data', ARGV[at + 1])
        else
            redis.call('XADD', output, '*',
                'message_id', ARGV[at], 'consumer_id', consumer, 'data', ARGV[at + 1])
        end
        written = written + 1
    end
    at = at + 2
end
local dead_flags = {}
for j = outputs + 1, outputs + deads do
    if seen[j] then
        skipped = skipped + 1
        dead_flags[#dead_flags + 1] = '0'
    else
        local fields = {'reason_code', ARGV[at + 1], 'reason', ARGV[at + 2], 'raw', ARGV[at + 3],
            'consumer_id', consumer, 'time', ARGV[at + 4]}
        if ARGV[at] ~= '' then
            fields[#fields + 1], fields[#fields + 2] = 'message_id', ARGV[at]
        end
        if maxlen > 0 then
            redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', unpack(fields))
        else
            redis.call('XADD', KEYS[2], '*', unpack(fields))
        end
        dead = dead + 1
        dead_flags[#dead_flags + 1] = '1'
    end
    at = at + 5
end

if written + dead > 0 then
    local key = prefix .. string.format('%.0f', bucket)
    if bucket ~= clock then
        redis.call('SET', KEYS[5], string.format('%.0f', bucket))
    end
    if any_seen then
        local new = {}
        for j = 1, outputs + deads do
            if not seen[j] then
                new[#new + 1] = ARGV[first + j - 1]
            end
        end
        redis.call('SADD', key, unpack(new))
    else
        redis.call('SADD', key, unpack(ARGV, first, last))
    end
    -- Checked by the k buckets after it. The first write of a later bucket UNLINKs it (freed
    -- off the main thread: a set can hold millions of digests); the expiry is the backstop.
    redis.call('PEXPIREAT', key, string.format('%.0f', (bucket + k + 2) * width))
end
redis.call('UNLINK', prefix .. string.format('%.0f', bucket - k - 1))
if written > 0 then redis.call('HINCRBY', KEYS[3], 'written', written) end
if dead > 0 then redis.call('HINCRBY', KEYS[3], 'dead', dead) end
if skipped > 0 then redis.call('HINCRBY', KEYS[3], 'skipped', skipped) end
return {written, dead, skipped, table.concat(dead_flags)}
