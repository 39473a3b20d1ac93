-- Replay one dead letter, atomically: forget its message_id in the dedup window when that is
-- safe, publish its payload to the channel, and delete it once a subscriber received it.
--
-- KEYS[1]  the dead-letter stream
-- KEYS[2]  the bucket clock: the newest dedup bucket written (see bucket.lua)
-- KEYS[3]  the replay record: a hash, message_id digest -> the newest entry id of KEYS[1] when a
--          replay last forgot it
-- ARGV[1]  the dead letter's entry id
-- ARGV[2]  the digest of its message_id (as dedup.py makes it)
-- ARGV[3]  seen-set key prefix: the set of time bucket b is ARGV[3] .. b
-- ARGV[4]  how many earlier buckets a write checks besides the current one (k)
-- ARGV[5]  the channel, ARGV[6] the command that publishes to it: PUBLISH, or SPUBLISH
-- ARGV[7]  how long the replay record is kept after the last forget, in ms
--
-- Returns {receivers, forgotten}: how many subscribers the payload reached, and 1 when the
-- message_id was forgotten (0 when it was left as it was); {-1, 0} when the entry is gone.
--
-- Why the message_id may be forgotten: a dead letter's id is remembered as an output's is, so a
-- replay the window still remembers would be skipped as a duplicate. Forgetting it is safe only
-- while the last thing written for that id is a dead letter. Within the window nothing more is
-- written for an id until it is forgotten, and only a replay forgets one (recorded, whether the
-- publish reached anyone or not). So the id is forgotten only when this entry was appended
-- after its last forget (entry ids, not clocks, tell): nothing was written for it since. An
-- older entry (two dead letters of one message_id, or a replay that reached no subscriber tried
-- again after the id came back another way) is published without forgetting: the consumers
-- skip it if the id was written since, and write it if it was not.
--
-- Costs k + 2 SREM at most; the entry is found by its id.

local entry = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])[1]
if not entry then
    return {-1, 0}
end
local raw
for i = 1, #entry[2], 2 do
    if entry[2][i] == 'raw' then
        raw = entry[2][i + 1]
    end
end
if not raw then
    return {-1, 0}
end

local function after(id, other)
    local ms, seq = string.match(id, '^(%d+)-(%d+)$')
    local other_ms, other_seq = string.match(other, '^(%d+)-(%d+)$')
    ms, other_ms = tonumber(ms), tonumber(other_ms)
    return ms > other_ms or (ms == other_ms and tonumber(seq) > tonumber(other_seq))
end

local last = redis.call('HGET', KEYS[3], ARGV[2])
local forget = not last or after(ARGV[1], last)
if forget then
    -- Every set a write checks is at or below the bucket clock, and at most k + 1 below it.
    local clock, k = tonumber(redis.call('GET', KEYS[2])), tonumber(ARGV[4])
    if clock then
        for b = clock - k - 1, clock do
            redis.call('SREM', ARGV[3] .. string.format('%.0f', b), ARGV[2])
        end
    end
    -- Whatever is appended from now on has a greater id than the newest entry (this one, or later).
    local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1][1]
    redis.call('HSET', KEYS[3], ARGV[2], newest)
    redis.call('PEXPIRE', KEYS[3], ARGV[7])
end

local receivers = redis.call(ARGV[6], ARGV[5], raw)
if receivers > 0 then
    redis.call('XDEL', KEYS[1], ARGV[1])
end
return {receivers, forget and 1 or 0}
