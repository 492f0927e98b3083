-- ARGV: ttl, sender, user id.
local out = mine()
redis.call('SADD', KEYS[3], ARGV[3])
touch(tonumber(ARGV[1]))
return stale(release(out), 1)
