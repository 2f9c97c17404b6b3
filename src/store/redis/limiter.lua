-- tower-llm-ratelimit: check-and-charge, settle and peek for every algorithm, atomically.
--
-- The arithmetic mirrors src/algorithm/*.rs (the in-memory store), in microseconds instead
-- of nanoseconds; tests/store_parity.rs runs shared vectors against both.
--
-- Cost model: on Redis 7 every redis.call costs about as much as all of this script's
-- arithmetic (a fake client, command lookup, RESP reply parsed back into Lua), so the script
-- makes as few as it can: one MGET reads every string state (and the idempotency key), one
-- SET writes each state that changed (a counter keeps its TTL within a window), nothing is
-- written on a denial.
--
-- Arguments are one binary blob, ARGV[1], packed little-endian (struct.pack formats):
--   '<Bddd'    mode ('a' acquire, all or nothing; 's' settle; 'p' peek; 'f' an idempotent
--              request's attempt failed), now in microseconds (negative: use the server's
--              TIME, the default: clients' clocks can't skew it), idempotency TTL in
--              milliseconds (0: none; else KEYS[#KEYS] is the request's idempotency record,
--              in this call's slot; 'f' names that key alone, with no bucket), the wall
--              clock for calendar windows in microseconds since the Unix epoch (negative:
--              TIME, which is that clock)
--   then per bucket key i (KEYS[i]) '<Bdddddd':
--              algorithm (0 counter, 1 log, 2 gcra, 3 concurrency, 4/5/6 calendar hour/day/
--              month: UTC periods, computed here from the wall clock), limit, window_us, burst,
--              amount (acquire) or charged (settle), placement (settle; for a concurrency
--              acquire: the new lease's id, unique, < 2^53), actual (settle; in an acquire:
--              1 for a request count, the charges a free retry doesn't pay)
-- Every number is a double: exact below 2^53 (the client's values are; see mod.rs).
--
-- Every key names the states' format version (keys.rs, FORMAT): older versions' states (text)
-- live under other keys and are never read here. States are binary strings beginning with a
-- tag byte; a value with another tag (a rule that changed algorithm) or of another shape, or
-- a key of the wrong type, is another algorithm's state and the bucket starts afresh, as the
-- memory store resets it:
--   counter      '<Bddd' 1, window index, current count, previous count
--   log          '<Bd'   2, total, then '<dd' (time, amount) per entry, oldest first;
--                entries at one instant are merged, entries refunded to 0 are removed
--   gcra         '<Bd'   3, theoretical arrival time; '<Bdd' with the refunds given back (R)
--   idempotency  '<Bdd'  5, last attempt failed (1) or not (0), free retries used so far
--                (any other value, such as tag 4 of earlier versions, reads as none)
--   calendar     '<Bdd'  6, period index (hours or days since the epoch, months since
--                1970-01), count; kept until the period ends (+ 1 s)
-- An acquire with an idempotency record marked failed, fewer than MAX_FREE_RETRIES (3, as
-- src/store/mod.rs) used, is a free retry: its request counts are neither checked nor
-- charged (the failed attempt counted them); the other rules are decided as usual, and if
-- all admit, the record becomes (0, used + 1). Nothing else writes the record but 'f'.
-- Concurrency buckets are sorted sets of slots scored by their expiry (now + window): a
-- process that dies holding slots can't leak them past the window. A charge of n slots under
-- lease id L holds the members "L", "L:2", ..., "L:n".
-- In settle mode, adjustments naming one key several times apply one after the other to one
-- state, written once.
-- Reply (acquire/peek): one string of doubles, '<' .. 'd' x (2 + 4 x keys) (one bulk reply
--   costs the server less than an array of integers): denied_index (0-based, -1 none, -3
--   none and a free retry), retry_us (-1 none, -2 never), then per key:
--   limit, remaining, reset_us, placement. Settle replies { 0 }.

-- Bound on the first call: a function library is loaded in an environment without them.
local floor, min, spack, sunpack, byte, sub, format, call, pcall_, unpack_
local function bind()
  floor, min = math.floor, math.min
  spack, sunpack = struct.pack, struct.unpack
  byte, sub, format = string.byte, string.sub, string.format
  call, pcall_, unpack_ = redis.call, redis.pcall, unpack
end

-- struct formats by number of rules, built once per load (built per call, each costs two
-- string allocations and their hashing).
local ARGS_FORMAT, REPLY_FORMAT = {}, {}

-- The fast path's scratch tables (see main), reused by every call: per rule i the counter's
-- new state (false: delete the key, nil: unchanged) and its TTL (0: keep it).
local NEW, TTL, OUT = {}, {}, {}

local ACQUIRE, SETTLE, FAIL = 97, 115, 102 -- 'a', 's', 'f' ('p' peek)
-- State tags (literals below, to keep closures small): counter 1, log 2, gcra 3, idempotency 5,
-- calendar 6.
local MAX_FREE_RETRIES = 3

-- Per call (set by main; the helpers below read it): the time, and the wall clock (µs since
-- the epoch) for calendar windows.
local now, unix


local function ceil_div(a, b) return floor((a + b - 1) / b) end

-- Calendar periods (src/algorithm/calendar.rs), in microseconds ----------------------------
local US_HOUR, US_DAY = 3600000000, 86400000000

-- Howard Hinnant's civil_from_days and days_from_civil ("chrono-Compatible Low-Level Date
-- Algorithms"), for days >= 0 as calendar.rs: the year and month of a day since 1970-01-01,
-- and the day of the 1st of a month.
local function civil(days)
  local z = days + 719468
  local era = floor(z / 146097)
  local doe = z - era * 146097
  local yoe = floor((doe - floor(doe / 1460) + floor(doe / 36524) - floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + floor(yoe / 4) - floor(yoe / 100))
  local mp = floor((5 * doy + 2) / 153)
  local m
  if mp < 10 then m = mp + 3 else m = mp - 9 end
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end
local function first_of_month(y, m)
  if m <= 2 then y = y - 1 end
  local era = floor(y / 400)
  local yoe = y - era * 400
  local mp
  if m > 2 then mp = m - 3 else mp = m + 9 end
  local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + floor((153 * mp + 2) / 5)
  return era * 146097 + doe - 719468
end
-- The index of the period (alg 4 hour, 5 day, 6 month) containing t, and where period k ends.
local function period_index(alg, t)
  if alg == 4 then return floor(t / US_HOUR) end
  if alg == 5 then return floor(t / US_DAY) end
  local y, m = civil(floor(t / US_DAY))
  return (y - 1970) * 12 + m - 1
end
local function period_end(alg, k)
  if alg == 4 then return (k + 1) * US_HOUR end
  if alg == 5 then return (k + 1) * US_DAY end
  k = k + 1
  return first_of_month(1970 + floor(k / 12), k % 12 + 1) * US_DAY
end
-- Moves a calendar state to the period containing the wall clock (never back).
local function roll_period(s, alg)
  local k = period_index(alg, unix)
  if k > s.k then s.k = k; s.used = 0 end
end
local function until_end(s, alg)
  local wait = period_end(alg, s.k) - unix
  if wait < 1 then wait = 1 end
  return wait
end

-- States -----------------------------------------------------------------------------------
-- s.raw: the value read (false: none, or a key of another type), to skip unchanged writes.

local function load(k, alg, v)
  if alg == 3 then
    -- Live slots only (expired ones are removed when the set is written).
    local c = pcall_('ZCOUNT', k, format('(%d', now), '+inf')
    if type(c) == 'table' then call('DEL', k); c = 0 end
    return { count = c, add = {}, remove = {} }
  end
  if alg == 0 then
    if v and #v == 25 and byte(v, 1) == 1 then
      local _, win, cur, prev = sunpack('<Bddd', v)
      return { win = win, cur = cur, prev = prev, raw = v, win0 = win }
    end
    return { win = 0, cur = 0, prev = 0, raw = v }
  elseif alg == 1 then
    if v and #v >= 9 and (#v - 9) % 16 == 0 and byte(v, 1) == 2 then
      local _, total = sunpack('<Bd', v)
      return { body = sub(v, 10), total = total, raw = v, changed = false }
    end
    return { body = '', total = 0, raw = v, changed = false }
  elseif alg >= 4 then
    if v and #v == 17 and byte(v, 1) == 6 then
      local _, k, used = sunpack('<Bdd', v)
      return { k = k, used = used, raw = v }
    end
    return { k = 0, used = 0, raw = v }
  end
  if v and (#v == 9 or #v == 17) and byte(v, 1) == 3 then
    local _, tat = sunpack('<Bd', v)
    local r = 0
    if #v == 17 then r = sunpack('<d', v, 10) end
    return { tat = tat, r = r, raw = v }
  end
  return { tat = 0, r = 0, raw = v }
end

-- counter
local function roll(s, w)
  local k = floor(now / w)
  if k > s.win then
    if k == s.win + 1 then s.prev = s.cur else s.prev = 0 end
    s.cur = 0
    s.win = k
  end
end
local function elapsed(s, w)
  local e = now - s.win * w
  if e < 0 then return 0 end
  if e > w then return w end
  return e
end
local function carried(s, w)
  if s.prev == 0 then return 0 end
  return ceil_div(s.prev * (w - elapsed(s, w)), w)
end

-- log: s.body holds the entries, 16 bytes each, oldest first.
local function prune(s, w)
  local body, p = s.body, 1
  while p <= #body - 15 do
    local t, a = sunpack('<dd', body, p)
    if t + w > now then break end
    s.total = s.total - a
    p = p + 16
  end
  if p > 1 then s.body = sub(body, p); s.changed = true end
end
-- Appends (or merges into the newest entry at the same instant or later).
local function add_log(s, t, amount)
  if amount == 0 then return end
  local body = s.body
  local last = #body - 15
  if last >= 1 then
    local lt, la = sunpack('<dd', body, last)
    if lt >= t then
      s.body = sub(body, 1, last - 1) .. spack('<dd', lt, la + amount)
      s.total = s.total + amount
      s.changed = true
      return
    end
  end
  s.body = body .. spack('<dd', t, amount)
  s.total = s.total + amount
  s.changed = true
end

-- GCRA
local function backlog(s)
  if s.tat > now then return s.tat - now end
  return 0
end

-- check: returns nil (allow), or retry_us (-2 never)
local function check(s, alg, limit, w, burst, cost)
  if alg == 0 then
    roll(s, w)
    local c = carried(s, w)
    if s.cur + c + cost <= limit then return nil end
    if cost > limit then return -2 end
    local room = (limit - cost) * w
    local e = elapsed(s, w)
    local cur = s.cur * w
    local wait
    if cur <= room then
      local slack = floor((room - cur) / math.max(s.prev, 1))
      local need = w - slack
      if need < 0 then need = 0 end
      wait = need - e
    else
      local slack = floor(room / math.max(s.cur, 1))
      local e2 = w - slack
      if e2 < 0 then e2 = 0 end
      wait = (w - e) + e2
    end
    if wait < 1 then wait = 1 end
    return wait
  elseif alg == 1 then
    prune(s, w)
    if s.total + cost <= limit then return nil end
    if cost > limit then return -2 end
    local total, body = s.total, s.body
    for p = 1, #body - 15, 16 do
      local t, a = sunpack('<dd', body, p)
      total = total - a
      if total + cost <= limit then
        local wait = t + w - now
        if wait < 1 then wait = 1 end
        return wait
      end
    end
    return w
  elseif alg == 2 then
    local b = backlog(s)
    if b * limit + cost * w <= burst * w then return nil end
    if cost > burst then return -2 end
    local wait = b - floor((burst - cost) * w / limit)
    if wait < 1 then wait = 1 end
    return wait
  elseif alg >= 4 then
    roll_period(s, alg)
    if s.used + cost <= limit then return nil end
    if cost > limit then return -2 end
    return until_end(s, alg)
  else
    if s.count + cost <= limit then return nil end
    if cost > limit then return -2 end
    return 1000000
  end
end

-- concurrency: the member of slot j (1-based) of lease id
local function slot_member(id, j)
  if j == 1 then return format('%d', id) end
  return format('%d:%d', id, j)
end

-- charge: returns the placement
local function charge(s, alg, limit, w, cost, id)
  if alg == 0 then
    roll(s, w); s.cur = s.cur + cost; return s.win
  elseif alg == 1 then
    prune(s, w); add_log(s, now, cost); return now
  elseif alg == 2 then
    local start = s.tat
    if now > start then start = now end
    s.tat = start + ceil_div(cost * w, limit)
    -- The charge's end on the scale TAT + R (Gcra::adjust in gcra.rs).
    return s.tat + s.r
  elseif alg >= 4 then
    roll_period(s, alg); s.used = s.used + cost; return s.k
  end
  s.count = s.count + cost
  for j = 1, cost do s.add[#s.add + 1] = slot_member(id, j) end
  return id
end

local function adjust(s, alg, limit, w, placement, charged, actual)
  if alg == 0 then
    roll(s, w)
    if actual > charged then
      s.cur = s.cur + actual - charged
    else
      local refund = charged - actual
      if placement == s.win then
        s.cur = s.cur - min(refund, s.cur)
      elseif placement + 1 == s.win then
        s.prev = s.prev - min(refund, s.prev)
      end
    end
  elseif alg == 1 then
    prune(s, w)
    if actual > charged then
      add_log(s, now, actual - charged)
    else
      -- Entries at one instant were merged and expire together: the refund is exact. An
      -- entry refunded to 0 is removed, as by the memory store.
      local refund, body = charged - actual, s.body
      for p = 1, #body - 15, 16 do
        local t, a = sunpack('<dd', body, p)
        if t == placement then
          local taken = min(refund, a)
          local rest = ''
          if a > taken then rest = spack('<dd', t, a - taken) end
          s.body = sub(body, 1, p - 1) .. rest .. sub(body, p + 16)
          s.total = s.total - taken
          s.changed = true
          break
        end
        if t > placement then break end
      end
    end
  elseif alg == 2 then
    -- As Gcra::adjust (gcra.rs, where the rule is derived): a refund gives back at most the
    -- part of the charge still ahead of now, placement - R - now; R (the refunds given back)
    -- decays while the bucket is empty.
    if s.tat <= now then
      local r = s.r - (now - s.tat)
      if r < 0 then r = 0 end
      s.r = r
      s.tat = now
    end
    if actual > charged then
      s.tat = s.tat + ceil_div((actual - charged) * w, limit)
    elseif s.tat > now then
      local back = floor((charged - actual) * w / limit)
      local ahead = placement - s.r - now
      if ahead < back then back = ahead end
      if back > 0 then
        local tat = s.tat - back
        if tat < now then tat = now end
        s.r = s.r + (s.tat - tat)
        s.tat = tat
      end
    end
  elseif alg >= 4 then
    roll_period(s, alg)
    if actual > charged then
      s.used = s.used + actual - charged
    elseif placement == s.k then
      -- A refund into a period that has ended is dropped.
      s.used = s.used - min(charged - actual, s.used)
    end
  elseif actual < charged then
    for j = actual + 1, charged do s.remove[#s.remove + 1] = slot_member(placement, j) end
  else
    for j = charged + 1, actual do s.add[#s.add + 1] = slot_member(placement, j) end
  end
end

-- snapshot: limit, remaining, reset_us
local function peek(s, alg, limit, w, burst)
  if alg == 0 then
    roll(s, w)
    local remaining = limit - s.cur - carried(s, w)
    if remaining < 0 then remaining = 0 end
    local e = elapsed(s, w)
    local reset = 0
    if s.cur > 0 then reset = (w - e) + w elseif s.prev > 0 then reset = w - e end
    return limit, remaining, reset
  elseif alg == 1 then
    prune(s, w)
    local remaining = limit - s.total
    if remaining < 0 then remaining = 0 end
    local reset = 0
    local body = s.body
    if #body >= 16 then
      local t = sunpack('<d', body, #body - 15)
      reset = t + w - now
      if reset < 0 then reset = 0 end
    end
    return limit, remaining, reset
  elseif alg == 2 then
    local b = backlog(s)
    local free = burst * w - b * limit
    local remaining = 0
    if free > 0 then remaining = floor(free / w) end
    if remaining > burst then remaining = burst end
    return burst, remaining, b
  elseif alg >= 4 then
    roll_period(s, alg)
    local remaining = limit - s.used
    if remaining < 0 then remaining = 0 end
    return limit, remaining, until_end(s, alg)
  end
  local remaining = limit - s.count
  if remaining < 0 then remaining = 0 end
  return limit, remaining, 0
end

-- Writes a string state: deletes it when idle, skips it when unchanged (its TTL still
-- covers it: a state only needs to outlive the windows it counts).
local function put(key, s, value, ttl_ms)
  if value == nil then
    if s.raw then call('DEL', key) end
  elseif value ~= s.raw then
    call('SET', key, value, 'PX', format('%d', ttl_ms))
  end
end

local function store(key, s, alg, w)
  if alg == 0 then
    if s.cur == 0 and s.prev == 0 then put(key, s, nil); return end
    -- A counter only matters until its next window ends: that is its expiry, set when the
    -- window moves (or the key is new) and kept by the writes within a window (a SET that
    -- keeps the TTL costs Redis less than one that sets it).
    local value = spack('<Bddd', 1, s.win, s.cur, s.prev)
    if value == s.raw then return end
    if s.win0 == s.win then
      call('SET', key, value, 'KEEPTTL')
    else
      call('SET', key, value, 'PX', format('%d', floor(((s.win + 2) * w - now) / 1000) + 1))
    end
  elseif alg == 1 then
    if not s.changed then return end
    local body = s.body
    if #body < 16 then put(key, s, nil); return end
    local newest = sunpack('<d', body, #body - 15)
    put(key, s, spack('<Bd', 2, s.total) .. body, floor((newest + w - now) / 1000) + 1)
  elseif alg == 2 then
    -- Kept until its refunds have decayed too (a fresh state could not tell an earlier
    -- placement from its own).
    local until_ = s.tat + s.r
    if until_ <= now then put(key, s, nil); return end
    local value
    if s.r == 0 then value = spack('<Bd', 3, s.tat) else value = spack('<Bdd', 3, s.tat, s.r) end
    put(key, s, value, floor((until_ - now) / 1000) + 1)
  elseif alg >= 4 then
    if s.used == 0 then put(key, s, nil); return end
    -- Kept until its period ends, plus a second.
    put(key, s, spack('<Bdd', 6, s.k, s.used), floor(until_end(s, alg) / 1000) + 1000)
  else
    if #s.remove == 0 and #s.add == 0 then return end
    call('ZREMRANGEBYSCORE', key, '-inf', now)
    if #s.remove > 0 then call('ZREM', key, unpack(s.remove)) end
    if #s.add > 0 then
      local args = {}
      for j, m in ipairs(s.add) do args[2 * j - 1] = now + w; args[2 * j] = m end
      call('ZADD', key, unpack(args))
      call('PEXPIRE', key, floor(w / 1000) + 1)
    end
  end
end


-- Main ---------------------------------------------------------------------------------------

-- Idempotency records -----------------------------------------------------------------------

-- The free retries used by the record v (nil: none or unreadable), and whether its last
-- attempt failed.
local function record(v)
  if v and #v == 17 and byte(v, 1) == 5 then
    local _, failed, used = sunpack('<Bdd', v)
    return used, failed == 1
  end
  return nil, false
end

local function fail_attempt(key, ttl_ms)
  local used = record(call('GET', key)) or 0
  call('SET', key, spack('<Bdd', 5, 1, used), 'PX', format('%d', ttl_ms))
  return { 0 }
end

-- free_used: the record's free retries so far when this acquire is a free retry, else nil.
local function generic(KEYS, P, n, vals, free_used)
  local nkeys = #KEYS
  local mode, idem_ttl = P[1], P[3]
  local acquire = mode == ACQUIRE
  local states = { nil, nil, nil, nil, nil, nil, nil, nil }

  if mode == SETTLE then
    -- Adjustments naming one key several times apply one after the other to one state.
    local first = {}
    for i = 1, n do
      local k, b = KEYS[i], 4 + 7 * (i - 1)
      local f = first[k]
      if f then states[i] = states[f] else first[k] = i; states[i] = load(k, P[b + 1], vals[i]) end
      -- alg, limit, window, placement, charged, actual
      adjust(states[i], P[b + 1], P[b + 2], P[b + 3], P[b + 6], P[b + 5], P[b + 7])
    end
    for i = 1, n do
      local k = KEYS[i]
      if first[k] == i then store(k, states[i], P[4 + 7 * (i - 1) + 1], P[4 + 7 * (i - 1) + 3]) end
    end
    return { 0 }
  end

  -- (An acquire never names a key twice: the client rejects that; a peek names one.)
  local denied, retry = -1, -1
  for i = 1, n do
    local b = 4 + 7 * (i - 1)
    local s = load(KEYS[i], P[b + 1], vals[i])
    states[i] = s
    -- A free retry's request counts (flagged by the client) are neither checked nor charged.
    if acquire and not (free_used and P[b + 7] == 1) then
      local r = check(s, P[b + 1], P[b + 2], P[b + 3], P[b + 4], P[b + 5])
      if r then
        local worse
        if denied < 0 then worse = true
        elseif retry == -2 then worse = false
        elseif r == -2 then worse = true
        else worse = r > retry end
        if worse then denied = i - 1; retry = r end
      end
    end
  end

  local out = { denied, retry, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil,
                nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil }
  local charging = acquire and denied < 0
  for i = 1, n do
    local s, b, o = states[i], 4 + 7 * (i - 1), 4 * i - 1
    local alg, w = P[b + 1], P[b + 3]
    local placement = 0
    local charged = charging and not (free_used and P[b + 7] == 1)
    if charged then placement = charge(s, alg, P[b + 2], w, P[b + 5], P[b + 6]) end
    out[o], out[o + 1], out[o + 2] = peek(s, alg, P[b + 2], w, P[b + 4])
    out[o + 3] = placement
    if charged then store(KEYS[i], s, alg, w) end
  end

  if charging and free_used then
    -- The failure is used up: the next attempt is charged unless this one fails too.
    call('SET', KEYS[nkeys], spack('<Bdd', 5, 0, free_used + 1), 'PX', format('%d', idem_ttl))
    out[1] = -3
  end
  local m = 2 + 4 * n
  return spack(REPLY_FORMAT[n], unpack_(out, 1, m))
end

-- Main -----------------------------------------------------------------------------------------
--
-- Cost model (Redis 7.0's Lua, measured with callgrind): a C function call (struct, math,
-- string) costs as much as 5-20 bytecodes, a table write 3, a Lua function call 9. So the
-- common call, an acquire of counters only, runs inline on locals (the fast path below); any
-- other call (another algorithm, a denial, a settle or a peek) goes through the helpers above
-- (generic). Both compute the same arithmetic; the fast path writes nothing until every rule
-- has admitted, so handing over to the generic path is always possible.
-- Kept: without it Redis spends 30-45% more per call (commandstats usec_per_call, benches/redis.rs
-- "ours" counter rows: 1 rule 3.8-4.0 against 5.1-5.7 µs, 3 rules 7.4-9.0 against 9.8-12.3 µs).

local function main(KEYS, ARGV)
  if not call then bind() end
  local blob = ARGV[1]
  -- The header, then one record per rule: the rules' count is the blob's, and one more key
  -- than rules is the idempotency key.
  local n = (#blob - 25) / 49
  local fmt = ARGS_FORMAT[n]
  if not fmt then
    fmt = '<Bddd' .. string.rep('Bdddddd', n)
    ARGS_FORMAT[n] = fmt
    REPLY_FORMAT[n] = '<' .. string.rep('d', 2 + 4 * n)
  end
  -- Every value in one table of the right size, in one call (tables that grow cost more than
  -- the arithmetic): P[1..4] the header, then 7 per rule from P[5].
  local P = { sunpack(fmt, blob) }
  local mode, t = P[1], P[2]
  local nkeys = #KEYS
  local idem = nkeys > n
  if mode == FAIL then return fail_attempt(KEYS[nkeys], P[3]) end

  -- One MGET reads every string state and the idempotency record (a sorted set or any key
  -- of another type reads as nil: a fresh state, and the SET that writes it replaces the
  -- key).
  local vals
  local free_used = nil
  if mode == ACQUIRE and idem then
    vals = call('MGET', unpack_(KEYS))
    local used, failed = record(vals[nkeys])
    if failed and used < MAX_FREE_RETRIES then free_used = used end
  else
    vals = call('MGET', unpack_(KEYS, 1, n))
  end

  if t < 0 then
    local tm = call('TIME')
    t = tonumber(tm[1]) * 1000000 + tonumber(tm[2])
  end
  now = t
  unix = P[4]
  if unix < 0 then unix = t end

  if mode ~= ACQUIRE or free_used then return generic(KEYS, P, n, vals, free_used) end

  -- Fast path: check and charge every counter on locals (floor(x) is x - x % 1), keeping
  -- only the reply's values and the new states; hand over to generic() at the first rule
  -- of another algorithm or the first denial.
  local out, new, ttl = OUT, NEW, TTL
  for i = 1, n do
    local b = 7 * i - 3
    if P[b + 1] ~= 0 then return generic(KEYS, P, n, vals, nil) end
    local limit, w, cost = P[b + 2], P[b + 3], P[b + 5]
    local v = vals[i]
    local win, cur, prev, win0 = 0, 0, 0, -1
    if v and #v == 25 then
      local tag, a1, a2, a3 = sunpack('<Bddd', v)
      if tag == 1 then win, cur, prev, win0 = a1, a2, a3, a1 end
    end
    -- roll
    local k = t / w
    k = k - k % 1
    if k > win then
      if k == win + 1 then prev = cur else prev = 0 end
      cur = 0
      win = k
    end
    -- elapsed, carried
    local e = t - win * w
    if e < 0 then e = 0 elseif e > w then e = w end
    local c = 0
    if prev ~= 0 then
      c = (prev * (w - e) + w - 1) / w
      c = c - c % 1
    end
    if cur + c + cost > limit then return generic(KEYS, P, n, vals, nil) end
    -- charge, snapshot
    cur = cur + cost
    local remaining = limit - cur - c
    if remaining < 0 then remaining = 0 end
    local o = 4 * i - 1
    out[o], out[o + 1], out[o + 3] = limit, remaining, win
    if cur > 0 then out[o + 2] = (w - e) + w elseif prev > 0 then out[o + 2] = w - e else out[o + 2] = 0 end
    -- the new state (written below, once every rule has admitted)
    if cur == 0 and prev == 0 then
      if v then new[i] = false else new[i] = nil end
    else
      local value = spack('<Bddd', 1, win, cur, prev)
      if value == v then
        new[i] = nil
      else
        new[i] = value
        -- A counter only matters until its next window ends: that is its expiry, set when
        -- the window moves (or the key is new) and kept by the writes within a window (a
        -- SET that keeps the TTL costs Redis less than one that sets it).
        if win0 == win then
          ttl[i] = 0
        else
          local x = ((win + 2) * w - t) / 1000
          ttl[i] = x - x % 1 + 1
        end
      end
    end
  end

  for i = 1, n do
    local value = new[i]
    if value then
      local x = ttl[i]
      if x == 0 then
        call('SET', KEYS[i], value, 'KEEPTTL')
      else
        call('SET', KEYS[i], value, 'PX', format('%d', x))
      end
      new[i] = nil
    elseif value == false then
      call('DEL', KEYS[i])
      new[i] = nil
    end
  end
  out[1], out[2] = -1, -1
  return spack(REPLY_FORMAT[n], unpack_(out, 1, 2 + 4 * n))
end

return main(KEYS, ARGV)
