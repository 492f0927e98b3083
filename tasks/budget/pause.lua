-- KEYS[1] shared pause; ARGV[1] milliseconds. Extends, never shortens, a pause. Run
-- twice, the pause ends at most the retry's delay later: never shorter, never twice over.
local want = tonumber(ARGV[1])
if redis.call('PTTL', KEYS[1]) < want then
  redis.call('SET', KEYS[1], '1', 'PX', want)
  return 1
end
return 0
