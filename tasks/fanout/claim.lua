-- ARGV: sender, chunk index. 1: the sender may mint the chunk; 0: it is finished, or
-- another chunk task owns it (a second copy of its message). Run twice, the same answer.
if redis.call('SISMEMBER', KEYS[6], ARGV[2]) == 1 then return 0 end
local owner = redis.call('HGET', KEYS[9], ARGV[2])
if owner and owner ~= ARGV[1] and ARGV[1] ~= '' then return 0 end
redis.call('HSET', KEYS[9], ARGV[2], ARGV[1])
return 1
