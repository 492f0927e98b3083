-- ARGV: sender, chunk index, users, dispatched, failed.
local out = mine()
local moved = redis.call('SADD', KEYS[6], ARGV[2]) == 1
if moved then
  redis.call('HINCRBY', KEYS[1], 'inflight', -tonumber(ARGV[3]))
  redis.call('HINCRBY', KEYS[1], 'dispatched', tonumber(ARGV[4]))
  redis.call('HINCRBY', KEYS[1], 'failed', tonumber(ARGV[5]))
end
forget(ARGV[2])
return touch(release(out), moved)
