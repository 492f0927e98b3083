-- Pop the first message of KEYS[4..] and record it as unacknowledged, in one step.
-- KEYS[1] unacked hash, KEYS[2] unacked index, KEYS[3] this consumer's inbox.
-- ARGV[1] now, ARGV[2] tag of the message last received through this inbox ("" none),
-- ARGV[3] prefix of the seen keys, ARGV[4] SEEN_TTL, ARGV[5] INBOX_TTL.
-- Only copies of one message are dropped: what a task does, and whether it may run again,
-- is for the books that own that work, not for the transport.
-- Returns nil (nothing waiting), or {queue key, message, tag, copies dropped, again}:
-- ``again`` is 1 when this is the message of a take whose answer never arrived, and
-- then ``message`` is its unacked record ``[message, exchange, routing key]``.
-- A message's identity is its content less its delivery tag and less the fields that name
-- who sent it (Celery's ``origin`` header, its ``reply_to``): the same task sent again by
-- another process (a chunk task that resumed elsewhere) is the same message.
local function without(item, value)
  if type(value) ~= 'string' or value == '' then return item end
  local quoted = '"' .. value .. '"'
  local at = string.find(item, quoted, 1, true)
  if not at then return item end
  return item:sub(1, at - 1) .. item:sub(at + #quoted)
end

local prev = redis.call('HGET', KEYS[3], 'tag')
if prev and prev ~= ARGV[2] then
  local record = redis.call('HGET', KEYS[1], prev)
  if record then
    return {redis.call('HGET', KEYS[3], 'key'), record, prev, 0, 1}
  end
end
local dropped = 0
for i = 4, #KEYS do
  while true do
    local item = redis.call('RPOP', KEYS[i])
    if not item then break end
    local ok, msg = pcall(cjson.decode, item)
    local props = ok and type(msg) == 'table' and msg['properties']
    local tag = type(props) == 'table' and props['delivery_tag']
    if type(tag) ~= 'string' then
      redis.call('DEL', KEYS[3])
      return {KEYS[i], item, false, dropped, 0}
    end
    local same = without(item, tag)
    local headers = type(msg['headers']) == 'table' and msg['headers'] or {}
    same = without(same, headers['origin'])
    same = without(same, props['reply_to'])
    local seen = ARGV[3] .. redis.sha1hex(same)
    if redis.call('SET', seen, tag, 'NX', 'EX', ARGV[4]) == false then
      dropped = dropped + 1
    else
      local info = props['delivery_info']
      if type(info) ~= 'table' then info = {} end
      local record = '[' .. item .. ',' .. cjson.encode(info['exchange'] or '') .. ','
        .. cjson.encode(info['routing_key'] or '') .. ']'
      redis.call('ZADD', KEYS[2], ARGV[1], tag)
      redis.call('HSET', KEYS[1], tag, record)
      redis.call('HSET', KEYS[3], 'tag', tag, 'key', KEYS[i])
      redis.call('EXPIRE', KEYS[3], ARGV[5])
      return {KEYS[i], item, tag, dropped, 0}
    end
  end
end
redis.call('DEL', KEYS[3])
if dropped > 0 then return {false, false, false, dropped, 0} end
return nil
