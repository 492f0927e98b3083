-- ARGV: sender, segment index, spec json, chunks...
local out = mine()
if redis.call('HEXISTS', KEYS[1], 'total') == 0 then
  -- The state is new: 'counted' says its counts cover the run from its start, or
  -- ('rebuilt') that the state was lost after segments were staged.
  redis.call('HSET', KEYS[1], 'counted', redis.call('SCARD', KEYS[8]) == 0 and '1' or 'rebuilt')
end
local spec = cjson.decode(ARGV[3])
for k, v in pairs(spec) do redis.call('HSETNX', KEYS[1], k, v) end
local moved = redis.call('SADD', KEYS[8], ARGV[2]) == 1
if moved then
  for i = 4, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
  redis.call('HINCRBY', KEYS[1], 'segments', 1)
  redis.call('HINCRBY', KEYS[1], 'queued', #ARGV - 3)
end
return touch(release(out), moved)
