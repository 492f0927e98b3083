-- ARGV: sender, chunk indexes... The caller published these chunks' tasks.
for i = 2, #ARGV do
  if redis.call('HGET', KEYS[7], ARGV[i]) == ARGV[1] then
    redis.call('HDEL', KEYS[7], ARGV[i])
  end
end
return {}
