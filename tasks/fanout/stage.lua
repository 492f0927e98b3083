-- ARGV: ttl, sender, segment index, spec json, chunks...
local out = mine()
local spec = cjson.decode(ARGV[4])
for k, v in pairs(spec) do redis.call('HSETNX', KEYS[1], k, v) end
if redis.call('SADD', KEYS[8], ARGV[3]) == 1 then
  for i = 5, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
end
touch(tonumber(ARGV[1]))
return release(out)
