"""Lua scripts of the Redis transport. Each settles or moves entries atomically, so a
crash between two steps (ack, then re-add) can never lose or double a message.

Entry layout: the CloudEvents headers as fields plus ``body``; entries of a group's retry
stream also carry ``accord-attempt`` (the attempt of their next delivery) and
``accord-origin`` (the id of the entry they were first delivered as).
"""

from __future__ import annotations

__all__ = ["ACK", "CLAIM", "GIVE_BACK", "KEEP", "NACK", "PROMOTE", "REJECT"]

# Current server time in milliseconds: one clock for every consumer's due times.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

#: KEYS: source stream. ARGV: group, entry id, delete ("1" for a retry-stream entry).
ACK = """
local n = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if n == 1 and ARGV[3] == '1' then redis.call('XDEL', KEYS[1], ARGV[2]) end
return n
"""

#: KEYS: source stream, retry stream, delayed zset. ARGV: group, entry id, delete,
#: delay in ms, then the fields of the entry to deliver again (attempt already raised).
NACK = (
    """
local n = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if n == 0 then return 0 end
if ARGV[3] == '1' then redis.call('XDEL', KEYS[1], ARGV[2]) end
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
local delay = tonumber(ARGV[4])
if delay <= 0 then
  redis.call('XADD', KEYS[2], '*', unpack(fields))
else
"""
    + _NOW
    + """
  redis.call('ZADD', KEYS[3], now + delay, cmsgpack.pack(fields))
end
return 1
"""
)

#: KEYS: source stream, dead stream. ARGV: group, entry id, delete, then the fields of
#: the dead-letter entry.
REJECT = """
local n = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if n == 0 then return 0 end
if ARGV[3] == '1' then redis.call('XDEL', KEYS[1], ARGV[2]) end
local fields = {}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[2], '*', unpack(fields))
return 1
"""

#: Move due delayed entries into the retry stream; ZREM decides who moves each one, so
#: two consumers never both deliver it. KEYS: delayed zset, retry stream. ARGV: limit.
#: Returns ms until the next entry is due, or -1 when none waits.
PROMOTE = (
    _NOW
    + """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, member in ipairs(due) do
  if redis.call('ZREM', KEYS[1], member) == 1 then
    redis.call('XADD', KEYS[2], '*', unpack(cmsgpack.unpack(member)))
  end
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #nxt == 0 then return -1 end
return math.max(0, tonumber(nxt[2]) - now)
"""
)

#: XAUTOCLAIM entries idle longer than min-idle (their consumer died) and report each
#: one's delivery count. KEYS: stream. ARGV: group, consumer, min idle ms, count, the
#: cursor to scan the pending list from. Returns {next cursor, {id, fields, delivery
#: count} triples}: one call scans at most 10 x count pending entries, so the next
#: call goes on from where this one stopped ("0-0" again once the list is done).
CLAIM = """
local res = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[5],
                       'COUNT', tonumber(ARGV[4]))
local out = {}
for _, e in ipairs(res[2]) do
  if e[2] then
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], e[1], e[1], 1)
    local count = 1
    if #p > 0 then count = tonumber(p[1][4]) end
    out[#out + 1] = {e[1], e[2], count}
  end
end
return {res[1], out}
"""

#: Keep entries this consumer holds from being taken over (reset their idle time),
#: but only those still its own: one another member took over meanwhile (this
#: consumer's loop stalled past claim_idle) stays that member's. KEYS: stream.
#: ARGV: group, consumer, entry ids. Returns how many were kept.
KEEP = """
local kept = 0
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p > 0 and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    kept = kept + 1
  end
end
return kept
"""

#: Give every entry pending for this consumer back to its group (into the retry stream,
#: attempt raised by its delivery count), then forget the consumer. KEYS: source stream,
#: retry stream. ARGV: group, consumer, delete. Returns how many entries moved.
GIVE_BACK = """
local moved = 0
while true do
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 500, ARGV[2])
  if #pending == 0 then break end
  for _, p in ipairs(pending) do
    local id, count = p[1], tonumber(p[4])
    local entries = redis.call('XRANGE', KEYS[1], id, id)
    redis.call('XACK', KEYS[1], ARGV[1], id)
    if ARGV[3] == '1' then redis.call('XDEL', KEYS[1], id) end
    if #entries > 0 then
      local fields, out, base, origin = entries[1][2], {}, 1, id
      for i = 1, #fields, 2 do
        if fields[i] == 'accord-attempt' then base = tonumber(fields[i + 1]) or 1
        elseif fields[i] == 'accord-origin' then origin = fields[i + 1]
        else out[#out + 1] = fields[i]; out[#out + 1] = fields[i + 1] end
      end
      out[#out + 1] = 'accord-attempt'; out[#out + 1] = tostring(base + count)
      out[#out + 1] = 'accord-origin'; out[#out + 1] = origin
      redis.call('XADD', KEYS[2], '*', unpack(out))
      moved = moved + 1
    end
  end
end
redis.pcall('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return moved
"""
