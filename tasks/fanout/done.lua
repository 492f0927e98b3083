-- ARGV: sender, user id.
local out = mine()
local moved = redis.call('SADD', KEYS[3], ARGV[2]) == 1
if moved then redis.call('HINCRBY', KEYS[1], 'done_count', 1) end
return touch(stale(release(out), 1), moved)
