-- ARGV: ttl, sender, chunk index, users, dispatched, failed.
local out = mine()
local moved = redis.call('SADD', KEYS[6], ARGV[3]) == 1
if moved then
  redis.call('HINCRBY', KEYS[1], 'inflight', -tonumber(ARGV[4]))
  redis.call('HINCRBY', KEYS[1], 'dispatched', tonumber(ARGV[5]))
  redis.call('HINCRBY', KEYS[1], 'failed', tonumber(ARGV[6]))
end
forget(ARGV[3])
return touch(tonumber(ARGV[1]), release(out), moved)
