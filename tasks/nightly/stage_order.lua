-- KEYS: orders, user_orders, users. ARGV: client_order_id, order json, user id.
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  local current = redis.call('HGET', KEYS[2], ARGV[3])
  if not current then
    redis.call('RPUSH', KEYS[3], ARGV[3])
    current = ''
  end
  redis.call('HSET', KEYS[2], ARGV[3], current .. ARGV[1] .. ',')
  return 1
end
return 0
