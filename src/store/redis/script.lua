-- The script every batch runs (see batch.rs). ARGV: max_age_ms, max_messages, dedup_ms,
-- dedup_min, this node's run, the key prefix, the room history cap and age, a count n of
-- keys passed as arguments, those n keys, the writing shard, then the operations. The keys each operation
-- names, in order, are KEYS (n = 0), or in a Redis Cluster the n arguments (declared keys
-- must share one slot there; KEYS then holds only the first, which routes the call).
-- Returns one answer per operation.
-- Globals read once: a local is a register, a global a table lookup, and the append path
-- below runs once per message.
local ARGV, tonumber, call, byte = ARGV, tonumber, redis.call, string.byte
local maxage = tonumber(ARGV[1])
local maxlen = tonumber(ARGV[2])
local dedup_ms = tonumber(ARGV[3])
local dedup_min = tonumber(ARGV[4])
local me, prefix = ARGV[5], ARGV[6]
local t = call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local minid = string.format('%d', math.max(0, now - maxage))
local hmax, hage = tonumber(ARGV[7]), tonumber(ARGV[8])
-- In a cluster a script may touch only keys of its server: leases (`node:<run>`) are checked
-- by the caller then (see batch.rs).
local nkeys = tonumber(ARGV[9])
local cluster = nkeys > 0
local K = KEYS
if cluster then
  K = {}
  for j = 1, nkeys do K[j] = ARGV[9 + j] end
end
-- The writer: this run's shard that sent the batch. Its appends carry increasing attempt
-- numbers; a pair's dedup hash keeps the highest this writer landed or resolved ('~w:'
-- field), and an append at or below it is refused as stale: a write whose answer was lost
-- (fred may still send it after a reconnect) never lands after a later one.
local writer = me .. '/' .. ARGV[10 + nkeys]
local wfield = '~w:' .. writer
-- What follows the ids in a record this writer makes (see `record_id`).
local wtag = ' ' .. writer .. '/'
-- Offsets are near 1.8e15 (microseconds): exact in Lua's doubles, printed without exponent.
local function fmt(n) return string.format('%.0f', n) end
local function room_last(rd)
  local last = call('HGET', rd, '~last')
  if last then return tonumber(last) end
  -- A new (or long idle) room starts at the clock in microseconds, like the embedded one:
  -- offsets a client kept from an earlier life of the room are then below its history.
  last = now * 1000
  call('HSET', rd, '~last', fmt(last))
  return last
end
local room_ttl = fmt(hage + 60000)
-- Work done once per key per batch, not once per message, kept in flat tables (a table per
-- key would cost more than the lookups it saves): each stream's length, each pair's dedup
-- generation, and the TTL/rotation bookkeeping at the end. The age cap is enforced by loads
-- (they read from minid and trim, counted) and by an append that finds the stream at the
-- count cap (it trims first, so expired entries never cause a refusal); entries past the cap
-- are never returned.
local slen, sexpired, strimmed, sempty, sttl = {}, {}, {}, {}, {}
-- An inbox's TTL is twice the age cap. It is set when an append finds the inbox empty, and
-- whenever a pair appending to it has its own TTL set (created, rotated, every half window,
-- or when this node's age cap is larger than the one the pair last saw), not on every
-- append: each append comes through a pair whose TTL was set at most half a dedup window
-- ago, and the inbox's TTL with it, so no inbox expires under an entry younger than the age
-- cap, with half the cap to spare, as long as the dedup window is within the age cap (the
-- defaults: 24 h and 72 h). With a shorter age cap it is set on every append. Set right
-- after the write that needs it: a call that fails later leaves no inbox without a TTL.
local stream_ttl = string.format('%d', 2 * maxage)
local every_append = dedup_ms > maxage
local function stream_ttl_once(s)
  if not sttl[s] then
    sttl[s] = true
    call('PEXPIRE', s, stream_ttl)
  end
end
local function stream_len(s)
  local len = slen[s]
  if not len then
    len = call('XLEN', s)
    sexpired[s] = 0
    sempty[s] = len == 0
  end
  if len >= maxlen and not strimmed[s] then
    strimmed[s] = true
    local expired = call('XTRIM', s, 'MINID', minid)
    sexpired[s] = sexpired[s] + expired
    len = len - expired
  end
  slen[s] = len
  return len
end
-- A pair's dedup generation: '~born' when it started, '~old' 1 when an older one was kept
-- (0 or absent: none), '~fresh' when its TTL was last set (every half window, not every
-- batch), '~age' the inbox age cap its inbox's TTL was last set for.
-- `dstream`: the inbox each pair appended to in this batch.
-- `dwm`: this writer's watermark per pair, `dwm_set`: pairs whose watermark rose.
-- `dtop`: the highest message id the pair stored, any writer ('~top'; '' for none), and
-- `dtop_set`: pairs whose top rose.
local dborn, dold, dfresh, dage, dstream, dwm, dwm_set = {}, {}, {}, {}, {}, {}, {}
local dtop, dtop_set = {}, {}
local function pair(dcur)
  if dborn[dcur] == nil then
    local meta = call('HMGET', dcur, '~born', '~old', '~fresh', '~age', wfield, '~top')
    dborn[dcur] = tonumber(meta[1]) or false
    dold[dcur] = meta[2] == '1'
    dfresh[dcur] = tonumber(meta[3]) or 0
    dage[dcur] = tonumber(meta[4]) or 0
    dwm[dcur] = tonumber(meta[5]) or 0
    dtop[dcur] = meta[6] or ''
  end
end
-- Ids are decimal strings of 64-bit numbers (beyond a double's exact range): compared by
-- length, then as text.
local function id_above(a, b) return #a > #b or (#a == #b and a > b) end
-- An id's millisecond and issuer slot (42 | 13 | 9 bits, see delivery/ids.rs), exact: the
-- decimal digits divided by 2^22 one at a time (every step stays below 2^27).
local function id_clock(id)
  local ms, r = 0, 0
  for k = 1, #id do
    r = r * 10 + string.byte(id, k) - 48
    local q = math.floor(r / 4194304)
    ms = ms * 10 + q
    r = r - q * 4194304
  end
  return ms, math.floor(r / 512)
end
-- Whether `id` was issued after the pair's top by the clock (`issued_after` in
-- delivery/ids.rs): a later millisecond, or the same one from the same issuer. Ids of one
-- millisecond order by slot, not by time: another node's id there may have been given to a
-- send read before the top's. Ids 2^23 apart or more (doubles are off by at most 2^12 each
-- here) are in different milliseconds: the common case skips the division.
local function issued_after(id, top)
  if not id_above(id, top) then return false end
  if top == '' or tonumber(id) - tonumber(top) >= 8388608 then return true end
  local ims, islot = id_clock(id)
  local tms, tslot = id_clock(top)
  return ims > tms or islot == tslot
end
local function raise(dcur, attempt)
  if attempt > dwm[dcur] then
    dwm[dcur] = attempt
    dwm_set[dcur] = true
  end
end
-- The older generation's key: `dd-old:` where the current one has `dd:` (same slot).
local function older(dcur) return prefix .. 'dd-old:' .. string.sub(dcur, #prefix + 4) end
-- A cid's dedup record: '<id> <writer>/<attempt>' (older versions wrote '<id> <stream id>
-- <writer>/<attempt>', or the bare '<id>'). The answer to a resent cid is the id alone.
local function record_id(rec) return string.match(rec, '^%S+') end
-- A cid's record in the pair's current generation, else its older one.
local function recorded(dcur, cid)
  local rec = call('HGET', dcur, cid)
  if not rec and dold[dcur] then rec = call('HGET', older(dcur), cid) end
  return rec
end
-- Record `value` for a cid unless it is known (one call in the common case): returns the
-- earlier record if it was, else nil.
local function claim(dcur, cid, value)
  if call('HSETNX', dcur, cid, value) == 0 then return call('HGET', dcur, cid) end
  if not dold[dcur] then return nil end
  local prev = call('HGET', older(dcur), cid)
  -- Known to the older generation: undo the record just made.
  if prev then call('HDEL', dcur, cid) end
  return prev
end
-- Settle a write of this writer whose answer was lost (timed out, or the connection dropped
-- after it was sent): the watermark rises past it, so if it has not landed yet it never
-- will. Returns 'y' when it had landed (its cid's record is that attempt's: the entry is
-- kept and the shard answers its sender `accepted`), 'd<id>' when the cid is stored by
-- another attempt (an earlier run's, a dead node's: answered `accepted` with that id, as a
-- resend would be), 'n' when not stored at all (the shard answers `unavailable`).
local function resolve(dcur, cid, attempt)
  raise(dcur, tonumber(attempt))
  local rec = recorded(dcur, cid)
  if not rec then return 'n' end
  local tag = string.match(rec, ' (%S+)$')
  if tag == writer .. '/' .. attempt then return 'y' end
  return 'd' .. record_id(rec)
end
-- Other nodes holding a device of a user (directory entry read once per batch), and a push
-- to each of them over its channel. Entries of dead runs only cost a PUBLISH nobody hears;
-- presence questions clean them up.
-- `to_me`: this node too when it is in the entry (inbox entries: a node's mirror of a user
-- is fed from its channel alone, in the order Redis ran the appends, whichever node made
-- them). Returns how many *other* nodes it went to.
local locations = {}
local function nodes_of(loc)
  local nodes = locations[loc]
  if not nodes then
    nodes = call('SMEMBERS', loc)
    locations[loc] = nodes
  end
  return nodes
end
local function push(nodes, payload, to_me)
  local sent = 0
  for _, n in ipairs(nodes) do
    if n ~= me or to_me then call('PUBLISH', prefix .. 'ch:' .. n, payload) end
    if n ~= me then sent = sent + 1 end
  end
  return sent
end
-- An inbox's recipient and directory entry, named from the inbox key (`in:{u:<to>}`, see
-- keys.rs; the same slot) once per inbox and call: two strings less per message on the wire.
local sloc = {}
local function location_of(s)
  local loc = sloc[s]
  if not loc then
    loc = prefix .. 'loc:' .. string.sub(s, #prefix + 4)
    sloc[s] = loc
  end
  return loc
end
local function recipient_of(s) return string.sub(s, #prefix + 7, -2) end
-- Append one message (op 'A' at ARGV[i]: id, cid, packed message, attempt) to stream `s`
-- through pair hash `dcur`. Returns the
-- answer: the bare stream id (the common case), {'ok', id, trimmed, pushed}, {'dup', first
-- id, trimmed}, {'full', trimmed, count} or {'stale'}. `watch` (op 'a', the push webhook is
-- on): an entry stored while nobody holds a device of the recipient anywhere answers {'ok',
-- id, trimmed, 0, 1} (a push is due, sent by this node alone).
local function append(s, dcur, i, watch)
  local id, cid, attempt = ARGV[i + 1], ARGV[i + 2], ARGV[i + 4]
  pair(dcur)
  local n_attempt = tonumber(attempt)
  if n_attempt <= dwm[dcur] then
    -- Sent before a later write of this writer landed (or was resolved): writing it now
    -- would put it after messages accepted since, or after it was answered `unavailable`.
    return {'stale'}
  end
  raise(dcur, n_attempt)
  -- A read receipt (cid '~r:<sender>:<id>') replaces the pair's earlier one still in the
  -- inbox; one at or below it is a duplicate (see proto.rs, RECEIPT_CID_PREFIX).
  local rkey = byte(cid, 1) == 126 and string.match(cid, '^(~r:.*):%d+$')
  if not rkey and not issued_after(id, dtop[dcur]) then
    -- Below an id the pair stored, from any writer (or in its millisecond from another):
    -- another node's write whose answer was lost, landing after the writes of the node its
    -- sender moved to. Landing, it would break the rules clients order `accepted` by: a
    -- pair's ids increase in store order, and a send is stored after another only if the
    -- gateway read it later. A resend of a stored cid is still answered with its id.
    local prev = recorded(dcur, cid)
    if prev then return {'dup', record_id(prev), 0} end
    return {'stale'}
  end
  local len = stream_len(s)
  local packed, xid, prev = ARGV[i + 3], nil, nil
  if len < maxlen and not rkey then
    -- The common case, a new message below the cap: append, then check and record the cid
    -- with its full record (see `record_id`) in one call; a duplicate (a resend) takes its
    -- entry back below. Two writes per new message, not three. The entry goes first so that a
    -- record never exists without it: had the script stopped between the two, a resend would
    -- take back a stray entry, never be answered with an id that nothing stored.
    -- No MAXLEN: the count cap is this script's (`stream_len`, every writer's appends come
    -- through it), and an XADD below it would never trim.
    xid = call('XADD', s, '*', 'm', packed)
    prev = claim(dcur, cid, id .. wtag .. attempt)
    if prev then
      call('XDEL', s, xid)
      -- An inbox the append created is left empty: it gets its TTL like any new inbox.
      if len == 0 then stream_ttl_once(s) end
    end
  elseif len >= maxlen then
    prev = recorded(dcur, cid)
  else
    -- A receipt: check and record the cid first, as its earlier one may go.
    prev = claim(dcur, cid, id)
  end
  -- Every answer takes the entries trimmed so far for this stream (counted once).
  local trimmed = sexpired[s]
  sexpired[s] = 0
  if prev then return {'dup', record_id(prev), trimmed} end
  if len >= maxlen then return {'full', trimmed, len} end
  if rkey then
    local rold = call('HGET', dcur, rkey)
    if rold then
      local oxid, oid = string.match(rold, '^(%S+) (%S+)$')
      if #id < #oid or (#id == #oid and id <= oid) then
        call('HDEL', dcur, cid)
        return {'dup', oid, trimmed}
      end
      local n = call('XDEL', s, oxid)
      len = len - n
    end
    xid = call('XADD', s, '*', 'm', packed)
    call('HSET', dcur, rkey, xid .. ' ' .. id)
    -- The full record (see `record_id`), so that a resolve can tell its attempt.
    call('HSET', dcur, cid, id .. wtag .. attempt)
  end
  slen[s] = len + 1
  if every_append or sempty[s] then stream_ttl_once(s) end
  dstream[dcur] = s
  if not rkey then
    dtop[dcur] = id
    dtop_set[dcur] = true
  end
  local pushed, nodes = 0, nodes_of(location_of(s))
  if #nodes > 0 then
    local to = recipient_of(s)
    pushed = push(nodes, 'm ' .. xid .. ' ' .. string.len(to) .. ' ' .. to .. packed, true)
  end
  if watch and #nodes == 0 then return {'ok', xid, trimmed, 0, 1} end
  -- The common answer is the bare stream id (a nested reply per message costs).
  if trimmed == 0 and pushed == 0 then return xid end
  return {'ok', xid, trimmed, pushed}
end
-- A device acked message `id` of `sender` (R and D ops; '' when the entry was no message):
-- keep the highest id per sender in the user's `rcv` hash, which read receipts are checked
-- against after a restart or on another node. Bounded per user; lives as long as an inbox.
local function got(rk, sender, id)
  if sender == '' then return end
  local old = call('HGET', rk, sender)
  if old and (#old > #id or (#old == #id and old >= id)) then return end
  if not old and call('HLEN', rk) >= 4096 then return end
  call('HSET', rk, sender, id)
  call('PEXPIRE', rk, stream_ttl)
end
local out = {}
local i, k = 11 + nkeys, 1
while i <= #ARGV do
  local op = ARGV[i]
  if op == 'V' then
    -- Resolve: n pairs of (cid, attempt) of this writer whose answers were lost (see
    -- `resolve`); answers their fates, space-separated, in order (letters first, so that no
    -- client takes the answer for a number).
    local dcur = K[k + 1]
    local n = tonumber(ARGV[i + 1])
    k = k + 2
    pair(dcur)
    local fates = {}
    for j = 1, n do
      fates[j] = resolve(dcur, ARGV[i + 2 * j], ARGV[i + 2 * j + 1])
    end
    out[#out + 1] = table.concat(fates, ' ')
    i = i + 2 + 2 * n
  elseif op == 'A' or op == 'a' then
    out[#out + 1] = append(K[k], K[k + 1], i, op == 'a')
    k = k + 2
    i = i + 5
  elseif op == 'R' then
    local n = call('XDEL', K[k], ARGV[i + 1])
    if slen[K[k]] then slen[K[k]] = slen[K[k]] - n end
    got(K[k + 1], ARGV[i + 2], ARGV[i + 3])
    out[#out + 1] = n
    k = k + 2
    i = i + 4
  elseif op == 'D' then
    -- Removed by this ack (not an earlier one): the sender's other nodes hear `delivered`.
    local n = call('XDEL', K[k], ARGV[i + 1])
    if slen[K[k]] then slen[K[k]] = slen[K[k]] - n end
    if n == 1 then push(nodes_of(K[k + 1]), ARGV[i + 4], false) end
    got(K[k + 2], ARGV[i + 2], ARGV[i + 3])
    out[#out + 1] = n
    k = k + 3
    i = i + 5
  elseif op == 'Q' then
    -- Presence on *other* live nodes (the asking node answers for itself); entries of runs
    -- whose lease expired are dropped on the way.
    local n = tonumber(ARGV[i + 1])
    local online = {}
    for j = 1, n do
      local loc = K[k + j - 1]
      local on = 0
      for _, m in ipairs(call('SMEMBERS', loc)) do
        if m ~= me then
          if call('EXISTS', prefix .. 'node:' .. m) == 1 then
            on = 1
          else
            call('SREM', loc, m)
          end
        end
      end
      online[j] = on
    end
    out[#out + 1] = online
    k = k + n
    i = i + 2
  elseif op == 'B' then
    local rh, rd, rn = K[k], K[k + 1], K[k + 2]
    local room, id, field, packed = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
    k = k + 3
    i = i + 5
    local prev = call('HGET', rd, field)
    if prev then
      out[#out + 1] = {'dup', prev}
    else
      local offset = fmt(room_last(rd) + 1)
      call('HSET', rd, '~last', offset, field, id .. ' ' .. offset)
      call('XADD', rh, 'MAXLEN', '=', ARGV[7], '0-' .. offset, 'm', packed)
      -- Publish dedup reaches about as far back as the history: past four times its size
      -- it starts over (the counter stays).
      if call('HLEN', rd) > 4 * hmax + 1 then
        call('DEL', rd)
        call('HSET', rd, '~last', offset)
      end
      call('PEXPIRE', rh, room_ttl)
      call('PEXPIRE', rd, room_ttl)
      -- Every node with members, this one too: each node sees a room's messages in offset
      -- order on one connection (its channel), with the answers to its joins in between.
      local payload = 'r ' .. offset .. ' ' .. string.len(room) .. ' ' .. room .. packed
      for _, n in ipairs(call('SMEMBERS', rn)) do
        call('PUBLISH', prefix .. 'ch:' .. n, payload)
      end
      out[#out + 1] = {'ok', id .. ' ' .. offset}
    end
  elseif op == 'J' then
    local rh, rd, rn = K[k], K[k + 1], K[k + 2]
    local room, since, who = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
    k = k + 3
    i = i + 4
    call('SADD', rn, me)
    local others = {1}
    for _, n in ipairs(call('SMEMBERS', rn)) do
      if n ~= me then
        if cluster then
          others[#others + 1] = n
        elseif call('EXISTS', prefix .. 'node:' .. n) == 0 then
          call('SREM', rn, n)
        end
      end
    end
    local last = room_last(rd)
    local recovered = 0
    local parts = {}
    if since ~= '-' and tonumber(since) <= last then
      local minage = now - hage
      local first
      for _, e in ipairs(call('XRANGE', rh, '(0-' .. since, '+')) do
        local packed = e[2][2]
        local ts = tonumber(string.match(packed, '^%d+ (%d+) '))
        if ts and ts >= minage then
          local off = string.match(e[1], '^0%-(%d+)$')
          first = first or tonumber(off)
          parts[#parts + 1] = off .. ' ' .. string.len(packed) .. ' ' .. packed
        end
      end
      if tonumber(since) + 1 >= (first or last + 1) then recovered = 1 end
    end
    call('PUBLISH', prefix .. 'ch:' .. me, 'j ' .. who .. ' ' .. fmt(last) .. ' ' .. recovered
      .. ' ' .. string.len(room) .. ' ' .. room .. table.concat(parts))
    -- In a cluster: 1 then the other runs, whose leases the caller checks.
    if cluster then out[#out + 1] = others else out[#out + 1] = 1 end
  elseif op == 'P' then
    out[#out + 1] = 1
    i = i + 1
  else
    return redis.error_reply('ringgate: unknown store op ' .. tostring(op))
  end
end
-- Dedup generations this batch appended through: create, rotate, or refresh the TTL (every
-- half window, or for a larger age cap); each time the inbox's TTL first (see above).
local dedup_ttl = string.format('%d', 2 * dedup_ms)
for dcur, s in pairs(dstream) do
  local born = dborn[dcur]
  -- Rotate: the current generation becomes the older one (its TTL still runs), and the new
  -- one remembers that an older one exists.
  local rotate = born and now - born >= dedup_ms and call('HLEN', dcur) > dedup_min + 4
  if not born or rotate then
    stream_ttl_once(s)
    if rotate then call('RENAME', dcur, older(dcur)) end
    call('HSET', dcur, '~born', now, '~old', rotate and 1 or 0, '~fresh', now, '~age', maxage)
    call('PEXPIRE', dcur, dedup_ttl)
  elseif now - dfresh[dcur] >= dedup_ms / 2 or dage[dcur] < maxage then
    -- Two windows from at most half a window ago: every cid outlives its window by half.
    stream_ttl_once(s)
    call('HSET', dcur, '~fresh', now, '~age', maxage)
    call('PEXPIRE', dcur, dedup_ttl)
  end
end
-- Watermarks last (a rotation above moves the hash): a pair hash this creates gets the
-- dedup TTL, like one an append creates.
for dcur in pairs(dwm_set) do
  if dtop_set[dcur] then
    call('HSET', dcur, wfield, fmt(dwm[dcur]), '~top', dtop[dcur])
  else
    call('HSET', dcur, wfield, fmt(dwm[dcur]))
  end
  if not dborn[dcur] and not dstream[dcur] then call('PEXPIRE', dcur, dedup_ttl) end
end
return out
