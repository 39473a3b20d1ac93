-- The previous exactly-once write, kept as a baseline for demo/write_bench.py only (the daemon
-- uses processor/lua/dedup_append.lua): a lock key per id, SET NX PX, then XADD if won.
--
-- KEYS[1]  output stream
-- KEYS[2]  dead-letter stream
-- KEYS[3]  stats hash (group counters: written, dead, skipped)
-- KEYS[4]  heartbeat key of the writing consumer (its fence)
-- ARGV[1]  lock key prefix
-- ARGV[2]  lock TTL in ms (the dedup window)
-- ARGV[3]  consumer id written into every entry
-- ARGV[4]  fence token: the value KEYS[4] must hold, or "" to skip the check
-- ARGV[5]  approximate MAXLEN of both streams (XADD MAXLEN ~), or 0 to keep everything
-- ARGV[6..] four values per entry: kind ("o" output, "d" dead letter), lock id, a, b
--           output:      a = data (processed message as JSON), b unused; message_id = lock id
--           dead letter: a = reason, b = raw payload
--
-- Returns {written, dead, skipped, dead_flags}, or {-1, 0, 0, ""} when the fence token does not
-- match: the consumer was declared dead while it was stalled and must rejoin before it writes
-- anything. dead_flags has one character per dead-letter entry of the batch, in order: "1" when
-- it was appended, "0" when its lock was already taken (for the dead-letter counters by reason).
--
-- Each lock is taken with SET NX and the entry appended only when the lock was won, inside one
-- script, so no consumer can hold a lock for a message it has not written.

if ARGV[4] ~= '' and redis.call('GET', KEYS[4]) ~= ARGV[4] then
    return {-1, 0, 0, ''}
end

local prefix, ttl, consumer, maxlen = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[5])

local function append(stream, ...)
    if maxlen > 0 then
        return redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', ...)
    end
    return redis.call('XADD', stream, '*', ...)
end

local written, dead, skipped = 0, 0, 0
local dead_flags = {}
for i = 6, #ARGV, 4 do
    local lock_id = ARGV[i + 1]
    local won = redis.call('SET', prefix .. lock_id, 1, 'NX', 'PX', ttl)
    if ARGV[i] == 'o' then
        if won then
            append(KEYS[1], 'message_id', lock_id, 'consumer_id', consumer, 'data', ARGV[i + 2])
            written = written + 1
        else
            skipped = skipped + 1
        end
    elseif won then
        append(KEYS[2], 'reason', ARGV[i + 2], 'raw', ARGV[i + 3], 'consumer_id', consumer)
        dead = dead + 1
        dead_flags[#dead_flags + 1] = '1'
    else
        skipped = skipped + 1
        dead_flags[#dead_flags + 1] = '0'
    end
end
if written > 0 then redis.call('HINCRBY', KEYS[3], 'written', written) end
if dead > 0 then redis.call('HINCRBY', KEYS[3], 'dead', dead) end
if skipped > 0 then redis.call('HINCRBY', KEYS[3], 'skipped', skipped) end
return {written, dead, skipped, table.concat(dead_flags)}
