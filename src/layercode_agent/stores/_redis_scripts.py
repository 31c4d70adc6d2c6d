"""The Lua scripts `RedisStore` runs inside Redis, one per operation that must not be seen half done.

Redis runs a script atomically: no other command runs in between, so a revision check and the write
it guards cannot interleave with another writer's. It does not roll a script back, though, so every
script checks everything first and only then writes, and none can fail after its first write. The
`#!lua` first line (Redis 7+) makes Redis refuse a script up front when it is out of memory, instead of
failing it at its first write command. Scripts name some keys they compute (entries, scope indexes),
which is fine on one Redis server but not on Redis Cluster.

Keys (`P` is the store's prefix; a conversation id or scope can hold any character, since the fixed
part of every key family differs and a conversation key's last segment never contains `:`):

- `P entry:<entry id>` hash: `kind`, `message` (JSON), `parent` (absent for the first entry), and one
  `holder:<conversation id>` field per conversation holding it.
- `P conversation:<id>:record` hash: `revision`, `record` (JSON), `updated` (µs), `scope` (if any).
- `P conversation:<id>:entries` set: the entries the conversation holds: those it wrote and every
  entry its head and branches reach, forked ones included. An entry's holders mirror these sets.
- `P conversation:<id>:events` list: session events, oldest first.
- `P conversation:<id>:markers` sorted set: marker name -> expiry (ms); expires with its last marker.
- `P marker:<len(id)>:<id>:<name>` string with its own expiry (length-prefixed: names hold any character).
- `P index` and `P index:<scope>` sorted sets: conversation id -> `updated` (µs), to list by recency.
- `P rate:<key>` string: a rate limit's GCRA theoretical arrival time (µs on the Redis clock), expiring
  when that time passes, since an allowance whose time has passed is full again.
"""

from __future__ import annotations

__all__ = [
    "ADD_SESSION_EVENT",
    "DELETE_RECORD",
    "DELETE_UNRECORDED_EXTRAS",
    "READ_HISTORY",
    "READ_LOG",
    "READ_RECORDS",
    "REPLACE_MARKER",
    "SET_MARKER",
    "TAKE_ALLOWANCE",
    "WRITE_RECORD",
]

_PRELUDE = """
local prefix = ARGV[1]

local function conversation_key(conversation_id, part)
  return prefix .. 'conversation:' .. conversation_id .. ':' .. part
end

local function entry_key(entry_id)
  return prefix .. 'entry:' .. entry_id
end

local function index_key(scope)
  if scope then return prefix .. 'index:' .. scope end
  return prefix .. 'index'
end

local function optional(value)
  if value == cjson.null then return nil end
  return value
end

-- How many conversations hold an entry: its fields beyond kind, message and parent.
local function holder_count(key)
  local own = 2
  if redis.call('HEXISTS', key, 'parent') == 1 then own = 3 end
  return redis.call('HLEN', key) - own
end

-- Every key of a conversation (and the indexes listing it) lives `ttl` ms from now. Markers keep their own expiry.
local function refresh(conversation_id, ttl)
  local record_key = conversation_key(conversation_id, 'record')
  local held_key = conversation_key(conversation_id, 'entries')
  for _, key in ipairs({record_key, held_key, conversation_key(conversation_id, 'events'), index_key(nil)}) do
    redis.call('PEXPIRE', key, ttl)
  end
  local scope = redis.call('HGET', record_key, 'scope')
  if scope then redis.call('PEXPIRE', index_key(scope), ttl) end
  for _, entry_id in ipairs(redis.call('SMEMBERS', held_key)) do
    redis.call('PEXPIRE', entry_key(entry_id), ttl)
  end
end

local function delete_markers(index, marker_base)
  for _, name in ipairs(redis.call('ZRANGE', index, 0, -1)) do
    redis.call('DEL', marker_base .. name)
  end
  redis.call('DEL', index)
end
"""

WRITE_RECORD = (
    "#!lua\n"
    + _PRELUDE
    + """
-- KEYS: record, entries (held set), global index.
-- ARGV: prefix, header JSON {conversation_id, expected, revision, head, branches, scope, updated,
--       entries: [[id, parent, kind], ...], released, ttl}, record JSON, then each entry's message JSON.
local record_key, held_key = KEYS[1], KEYS[2]
local header = cjson.decode(ARGV[2])
local conversation_id = header.conversation_id
local expected = optional(header.expected)
local stored = redis.call('HGET', record_key, 'revision') or nil

if stored ~= expected then
  -- The same write retried after a lost reply has nothing left to do.
  if stored == header.revision then return 'done' end
  return 'conflict'
end
local new_ids = {}
for _, entry in ipairs(header.entries) do
  local entry_id, parent = entry[1], optional(entry[2])
  -- Each new entry follows a stored one or an earlier new one, so the log can never hold a cycle.
  if parent and not new_ids[parent] and redis.call('EXISTS', entry_key(parent)) == 0 then return 'conflict' end
  if new_ids[entry_id] or redis.call('EXISTS', entry_key(entry_id)) == 1 then
    return redis.error_reply('entry ' .. entry_id .. ' is already stored')
  end
  new_ids[entry_id] = true
end
local head_id = optional(header.head)
if head_id and not new_ids[head_id] and redis.call('EXISTS', entry_key(head_id)) == 0 then return 'conflict' end

-- Checked: from here on only writes that cannot fail.
for position, entry in ipairs(header.entries) do
  local fields = {'kind', entry[3], 'message', ARGV[3 + position]}
  local parent = optional(entry[2])
  if parent then
    fields[5] = 'parent'
    fields[6] = parent
  end
  redis.call('HSET', entry_key(entry[1]), unpack(fields))
end

local old_scope = redis.call('HGET', record_key, 'scope') or nil
local scope = optional(header.scope)
redis.call('DEL', record_key)
local fields = {'revision', header.revision, 'record', ARGV[3], 'updated', header.updated}
if scope then
  fields[7] = 'scope'
  fields[8] = scope
end
redis.call('HSET', record_key, unpack(fields))
redis.call('ZADD', KEYS[3], header.updated, conversation_id)
if old_scope and old_scope ~= scope then redis.call('ZREM', index_key(old_scope), conversation_id) end
if scope then redis.call('ZADD', index_key(scope), header.updated, conversation_id) end

-- Hold the new entries and everything the head and branches reach, up to what is already held.
local tips = {}
for _, entry in ipairs(header.entries) do tips[#tips + 1] = entry[1] end
if head_id then tips[#tips + 1] = head_id end
for _, tip in ipairs(header.branches) do tips[#tips + 1] = tip end
for _, tip in ipairs(tips) do
  local entry_id = tip
  while entry_id and redis.call('SISMEMBER', held_key, entry_id) == 0 do
    local key = entry_key(entry_id)
    if redis.call('EXISTS', key) == 0 then break end
    redis.call('SADD', held_key, entry_id)
    redis.call('HSET', key, 'holder:' .. conversation_id, '1')
    entry_id = redis.call('HGET', key, 'parent')
  end
end

-- Released entries go if this conversation alone holds them and its head and branches no longer reach them.
local reached = nil
for _, entry_id in ipairs(header.released) do
  local key = entry_key(entry_id)
  if redis.call('HEXISTS', key, 'holder:' .. conversation_id) == 1 and holder_count(key) == 1 then
    if not reached then
      reached = {}
      local reach_tips = {head_id}
      for _, tip in ipairs(header.branches) do reach_tips[#reach_tips + 1] = tip end
      for _, tip in pairs(reach_tips) do
        local reaching = tip
        while reaching and not reached[reaching] do
          reached[reaching] = true
          reaching = redis.call('HGET', entry_key(reaching), 'parent')
        end
      end
    end
    if not reached[entry_id] then
      redis.call('DEL', key)
      redis.call('SREM', held_key, entry_id)
    end
  end
end

local ttl = optional(header.ttl)
if ttl then refresh(conversation_id, ttl) end

-- Drop a few of the oldest index members whose records expired, so the indexes don't grow forever.
for _, index in ipairs({KEYS[3], scope and index_key(scope) or nil}) do
  for _, member in ipairs(redis.call('ZRANGE', index, 0, 3)) do
    if redis.call('EXISTS', conversation_key(member, 'record')) == 0 then redis.call('ZREM', index, member) end
  end
end
return 'ok'
"""
)
"""Check the revision, head and parents; store the entries and record; hold; release; refresh the retention."""

DELETE_RECORD = (
    "#!lua\n"
    + _PRELUDE
    + """
-- KEYS: record, entries (held set), events, markers index.  ARGV: prefix, conversation id, revision, marker key base.
local conversation_id = ARGV[2]
local stored = redis.call('HGET', KEYS[1], 'revision')
if not stored or stored ~= ARGV[3] then return 'conflict' end
local scope = redis.call('HGET', KEYS[1], 'scope')
redis.call('ZREM', index_key(nil), conversation_id)
if scope then redis.call('ZREM', index_key(scope), conversation_id) end
for _, entry_id in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local key = entry_key(entry_id)
  redis.call('HDEL', key, 'holder:' .. conversation_id)
  if holder_count(key) <= 0 then redis.call('DEL', key) end
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
delete_markers(KEYS[4], ARGV[4])
return 'ok'
"""
)
"""Check the revision; delete the record, its events and markers, and the entries no other conversation holds."""

DELETE_UNRECORDED_EXTRAS = (
    "#!lua\n"
    + _PRELUDE
    + """
-- KEYS: record, events, markers index.  ARGV: prefix, marker key base.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[2])
delete_markers(KEYS[3], ARGV[2])
return 1
"""
)
"""Delete a conversation's session events and markers unless it has a record."""

ADD_SESSION_EVENT = (
    "#!lua\n"
    + _PRELUDE
    + """
-- KEYS: events.  ARGV: prefix, conversation id, event JSON, retention in ms or ''.
redis.call('RPUSH', KEYS[1], ARGV[3])
if ARGV[4] ~= '' then refresh(ARGV[2], ARGV[4]) end
return 1
"""
)
"""Append a session event; with a retention, refresh the whole conversation's."""

_SET_AND_INDEX_MARKER = """
-- Set the marker, and index its name until it expires; the index expires with its last marker.
local function set_marker(key, index, value, ttl, name)
  redis.call('SET', key, value, 'PX', ttl)
  local time = redis.call('TIME')
  local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  redis.call('ZADD', index, now + tonumber(ttl), name)
  redis.call('ZREMRANGEBYSCORE', index, '-inf', now)
  local last = redis.call('ZRANGE', index, -1, -1, 'WITHSCORES')
  redis.call('PEXPIREAT', index, string.format('%.0f', tonumber(last[2]) + 1))
end
"""

SET_MARKER = (
    "#!lua\n"
    + _SET_AND_INDEX_MARKER
    + """
-- KEYS: marker, markers index.  ARGV: value, ttl in ms, '1' for only-if-absent, name.
if ARGV[3] == '1' then
  local current = redis.call('GET', KEYS[1])
  if current then return current end
end
set_marker(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[4])
return false
"""
)
"""SET (NX) PX, returning the live value instead when only-if-absent finds one; index the name until it expires."""

REPLACE_MARKER = (
    "#!lua\n"
    + _SET_AND_INDEX_MARKER
    + """
-- KEYS: marker, markers index.  ARGV: expected value, value, ttl in ms, name.  Returns 1 if replaced, else 0.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
set_marker(KEYS[1], KEYS[2], ARGV[2], ARGV[3], ARGV[4])
return 1
"""
)
"""Compare and set: replace the marker only if it still holds the expected value."""

TAKE_ALLOWANCE = """#!lua
-- KEYS: allowance.  ARGV: interval, period (both µs).  Returns 0 if allowed, else the µs to wait (at least 1).
local interval, period = tonumber(ARGV[1]), tonumber(ARGV[2])
-- Redis's clock, not the callers': servers whose clocks disagree still share one allowance.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local allow_at = tat + interval - period
-- Rounded up: Redis truncates numbers a script returns, and a caller waiting that long must then be let in.
if now < allow_at then return math.max(1, math.ceil(allow_at - now)) end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.17g', new_tat), 'PX', math.max(1, math.ceil((new_tat - now) / 1000)))
return 0
"""
"""GCRA on the Redis clock: count the request and move the theoretical arrival time on, or return the wait."""

_WALK = """
-- The entries from `entry_id` back to the first (at most `limit`, -1 for all), newest first, as
-- {id, kind, message[, parent]} rows; or nil and the id of the first entry that isn't stored.
local function walk(entry_id, limit)
  local rows = {}
  while entry_id and (limit < 0 or #rows < limit) do
    local fields = redis.call('HMGET', entry_key(entry_id), 'kind', 'message', 'parent')
    if not fields[2] then return nil, entry_id end
    local row = {entry_id, fields[1], fields[2]}
    if fields[3] then row[4] = fields[3] end
    rows[#rows + 1] = row
    entry_id = fields[3]
  end
  return rows
end
"""

READ_HISTORY = (
    "#!lua flags=no-writes\n"
    + _PRELUDE
    + _WALK
    + """
-- ARGV: prefix, head id, limit (-1 for none).  Returns {'ok', rows} (see `walk`), or {'missing', id}.
local rows, missing = walk(ARGV[2], tonumber(ARGV[3]))
if not rows then return {'missing', missing} end
return {'ok', rows}
"""
)
"""Walk a history from its head back, in one round trip."""

READ_LOG = (
    "#!lua flags=no-writes\n"
    + _PRELUDE
    + _WALK
    + """
-- ARGV: prefix, conversation id.  Returns {'none'} when there is no record, {'missing', id} at the first entry of
-- its history that isn't stored, or {'ok', record, rows} (see `walk`).
local record = redis.call('HGET', conversation_key(ARGV[2], 'record'), 'record')
if not record then return {'none'} end
local rows, missing = walk(optional(cjson.decode(record).head_id), -1)
if not rows then return {'missing', missing} end
return {'ok', record, rows}
"""
)
"""A conversation's record and its whole history, in one round trip (a turn's read)."""

READ_RECORDS = (
    "#!lua\n"
    + _PRELUDE
    + """
-- KEYS: index.  ARGV: prefix, '1' if scoped, scope, limit (-1 for none).  Prunes members whose record is gone.
local scoped, scope, limit = ARGV[2] == '1', ARGV[3], tonumber(ARGV[4])
local records = {}
local start = 0
while limit < 0 or #records < limit do
  local members = redis.call('ZREVRANGE', KEYS[1], start, start + 99)
  if #members == 0 then break end
  local gone = {}
  for _, member in ipairs(members) do
    local fields = redis.call('HMGET', conversation_key(member, 'record'), 'record', 'scope')
    if not fields[1] or (scoped and fields[2] ~= scope) then
      gone[#gone + 1] = member
    elseif limit < 0 or #records < limit then
      records[#records + 1] = fields[1]
    end
  end
  if #gone > 0 then redis.call('ZREM', KEYS[1], unpack(gone)) end
  start = start + #members - #gone
end
return records
"""
)
"""The records an index lists, most recently updated first, up to a limit."""
