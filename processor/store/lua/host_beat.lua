-- One host's heartbeat in the control plane, and what it needs to steer its consumers, in one
-- step: register (or refresh) the host, drop hosts whose registration expired, read the group's
-- desired size, the stop key, the group's counters and every live host.
--
-- KEYS[1]  hosts sorted set: member host id, score the time (ms, Redis's clock) it expires
-- KEYS[2]  host info hash: field host id, value what that host reports (JSON, with "instance")
-- KEYS[3]  control hash: desired, desired_by, desired_at_ms, autoscale
-- KEYS[4]  stop key: present (its value says who asked) while the group is asked to stop
-- KEYS[5]  group stats hash: written, dead, skipped
-- ARGV[1]  host id
-- ARGV[2]  registration TTL in ms
-- ARGV[3]  this host's info (JSON)
-- ARGV[4]  this daemon's instance token (also inside ARGV[3])
-- ARGV[5]  1 to claim the host id at start: refused while another live instance holds it
--
-- Returns {now_ms, claimed, control (flat field/value list), stop or '', written, dead, skipped,
-- hosts (flat id/info list), rejoined}. When claiming (ARGV[5] 1), nothing is written if the
-- group is asked to stop (the reply carries the stop) or another live instance holds the id
-- (claimed 0). rejoined is 1 when this host was not registered before this beat: its
-- registration had expired (an outage, a Redis restart), so the others may not have beaten yet. A host's expiry is kept as a score, not a key
-- TTL, so every read sees expired hosts gone without waiting for Redis to evict a key.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local host, ttl, info, instance = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]

local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
if #expired > 0 then
    redis.call('ZREM', KEYS[1], unpack(expired))
    redis.call('HDEL', KEYS[2], unpack(expired))
end

local stop = redis.call('GET', KEYS[4]) or ''
if ARGV[5] == '1' then
    if stop ~= '' then
        return {now, 1, {}, stop, 0, 0, 0, {}, 0}  -- a stopped group: do not register
    end
    if redis.call('ZSCORE', KEYS[1], host) then
        local held = redis.call('HGET', KEYS[2], host)
        local ok, holder = pcall(cjson.decode, held or '')
        if held and not (ok and type(holder) == 'table' and holder.instance == instance) then
            return {now, 0, {}, '', 0, 0, 0, {}, 0}
        end
    end
end
local rejoined = redis.call('ZSCORE', KEYS[1], host) and 0 or 1
redis.call('ZADD', KEYS[1], now + ttl, host)
redis.call('HSET', KEYS[2], host, info)

local hosts = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    hosts[#hosts + 1] = id
    hosts[#hosts + 1] = redis.call('HGET', KEYS[2], id) or '{}'
end
local stats = redis.call('HMGET', KEYS[5], 'written', 'dead', 'skipped')
return {
    now, 1, redis.call('HGETALL', KEYS[3]), stop,
    tonumber(stats[1]) or 0, tonumber(stats[2]) or 0, tonumber(stats[3]) or 0, hosts, rejoined
}
