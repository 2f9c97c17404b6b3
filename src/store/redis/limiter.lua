-- tower-llm-ratelimit: check-and-charge, settle and peek for every algorithm, atomically.
--
-- The arithmetic mirrors src/algorithm/*.rs (the in-memory store), in microseconds instead
-- of nanoseconds; tests/store_parity.rs runs shared vectors against both.
--
-- ARGV[1] mode: "a" acquire (all or nothing), "s" settle, "p" peek
-- ARGV[2] now in microseconds, or "-1" to use the server's TIME (the default: clients' clocks
--         can't skew it)
-- ARGV[3] idempotency: "" or "1" when KEYS[#KEYS] is the request's idempotency key
-- ARGV[4] idempotency TTL in milliseconds
-- then, per bucket key i (KEYS[i]), 7 values:
--   algorithm (0 counter, 1 log, 2 gcra, 3 concurrency), limit, window_us, burst,
--   amount (acquire) or charged (settle), placement (settle; for a concurrency acquire: the
--   new lease's id, unique, < 2^53), actual (settle)
-- Concurrency buckets are sorted sets of slots scored by their expiry (now + window): a
-- process that dies holding slots can't leak them past the window. A charge of n slots under
-- lease id L holds the members "L", "L:2", ..., "L:n".
-- In settle mode, adjustments naming one key several times apply one after the other to one
-- state, written once.
-- Reply (acquire/peek): { denied_index (0-based, -1 none, -3 none and replayed from the
--   idempotency key), retry_us (-1 none, -2 never),
--   then per key: limit, remaining, reset_us, placement }. Settle replies { 0 } (an array,
--   like every other reply).

local floor = math.floor
local mode = ARGV[1]
local now = tonumber(ARGV[2])
if now < 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local idem = ARGV[3] == '1'
local idem_ttl = tonumber(ARGV[4])
local n = #KEYS
if idem then n = n - 1 end

if mode == 'a' and idem then
  local seen = redis.call('GET', KEYS[#KEYS])
  if seen then
    local out = {}
    for v in string.gmatch(seen, '[^,]+') do out[#out + 1] = tonumber(v) end
    -- A replayed admission says so (-3), so the caller doesn't settle it a second time.
    if out[1] == -1 then out[1] = -3 end
    return out
  end
end

local function ceil_div(a, b) return floor((a + b - 1) / b) end

-- States -----------------------------------------------------------------------------------

-- A key holding another algorithm's state (two rules of one name with different algorithms,
-- e.g. two layers sharing a store) starts afresh, as the memory store resets it: the wrong
-- type of key, or a string that is not this algorithm's. (Not an error: that would fail
-- every request of the rule and count against the circuit breaker.)
local function wrong_type(reply) return type(reply) == 'table' and reply.err ~= nil end

local function load(key, alg)
  if alg == 1 then
    local raw = redis.pcall('LRANGE', key, 0, -1)
    if wrong_type(raw) then redis.call('DEL', key); raw = {} end
    local ts, amts, total = {}, {}, 0
    for i = 1, #raw do
      local t, a = string.match(raw[i], '^(%d+) (%d+)$')
      ts[i] = tonumber(t); amts[i] = tonumber(a); total = total + amts[i]
    end
    return { ts = ts, amts = amts, total = total, head = 1, dirty = false, loaded = #raw,
             set_last = false, pushed = {} }
  end
  if alg == 3 then
    if wrong_type(redis.pcall('ZREMRANGEBYSCORE', key, '-inf', now)) then
      redis.call('DEL', key)
    end
    return { count = redis.call('ZCARD', key), add = {}, remove = {} }
  end
  local v = redis.pcall('GET', key)
  if wrong_type(v) then redis.call('DEL', key); v = false end
  if alg == 0 then
    if v then
      local k, c, p = string.match(v, '^(%d+) (%d+) (%d+)$')
      if k then return { win = tonumber(k), cur = tonumber(c), prev = tonumber(p) } end
      redis.call('DEL', key)
    end
    return { win = 0, cur = 0, prev = 0 }
  end
  if alg == 2 then
    if v then
      local tat = string.match(v, '^(%d+)$')
      if tat then return { tat = tonumber(tat) } end
      redis.call('DEL', key)
    end
    return { tat = 0 }
  end
  return { count = 0 }
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

-- log
local function prune(s, w)
  while s.head <= #s.ts and s.ts[s.head] + w <= now do
    s.total = s.total - s.amts[s.head]
    s.head = s.head + 1
  end
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
    local total = s.total
    for i = s.head, #s.ts do
      total = total - s.amts[i]
      if total + cost <= limit then
        local wait = s.ts[i] + w - now
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
  else
    if s.count + cost <= limit then return nil end
    if cost > limit then return -2 end
    return 1000000
  end
end

-- concurrency: the member of slot j (1-based) of lease id
local function slot_member(id, j)
  if j == 1 then return string.format('%d', id) end
  return string.format('%d:%d', id, j)
end

-- Appends (or merges into the newest entry at the same instant); remembers how to write it.
local function add_log(s, t, amount)
  if amount == 0 then return end
  local last = #s.ts
  if last >= s.head and s.ts[last] >= t then
    s.amts[last] = s.amts[last] + amount
    if last <= s.loaded then s.set_last = true else s.pushed[#s.pushed] = last end
  else
    s.ts[last + 1] = t; s.amts[last + 1] = amount
    s.pushed[#s.pushed + 1] = last + 1
  end
  s.total = s.total + amount
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
    return 0
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
        s.cur = s.cur - math.min(refund, s.cur)
      elseif placement + 1 == s.win then
        s.prev = s.prev - math.min(refund, s.prev)
      end
    end
  elseif alg == 1 then
    prune(s, w)
    if actual > charged then
      add_log(s, now, actual - charged)
    else
      local refund = charged - actual
      for i = s.head, #s.ts do
        if s.ts[i] == placement then
          local taken = math.min(refund, s.amts[i])
          s.amts[i] = s.amts[i] - taken
          s.total = s.total - taken
          s.dirty = true
          break
        end
      end
    end
  elseif alg == 2 then
    if actual > charged then
      local start = s.tat
      if now > start then start = now end
      s.tat = start + ceil_div((actual - charged) * w, limit)
    elseif s.tat > now then
      local back = floor((charged - actual) * w / limit)
      s.tat = s.tat - back
      if s.tat < now then s.tat = now end
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
    for i = #s.ts, s.head, -1 do
      if s.amts[i] > 0 then reset = s.ts[i] + w - now; break end
    end
    if reset < 0 then reset = 0 end
    return limit, remaining, reset
  elseif alg == 2 then
    local b = backlog(s)
    local free = burst * w - b * limit
    local remaining = 0
    if free > 0 then remaining = floor(free / w) end
    if remaining > burst then remaining = burst end
    return burst, remaining, b
  end
  local remaining = limit - s.count
  if remaining < 0 then remaining = 0 end
  return limit, remaining, 0
end

local function store(key, s, alg, w)
  if alg == 0 then
    if s.cur == 0 and s.prev == 0 then redis.call('DEL', key); return end
    redis.call('SET', key, string.format('%d %d %d', s.win, s.cur, s.prev), 'PX', floor(2 * w / 1000) + 1)
  elseif alg == 1 then
    if s.dirty then
      -- A refund: rewrite what is left in the window.
      redis.call('DEL', key)
      local items = {}
      for i = s.head, #s.ts do
        if s.amts[i] > 0 then items[#items + 1] = string.format('%d %d', s.ts[i], s.amts[i]) end
      end
      if #items > 0 then redis.call('RPUSH', key, unpack(items)) end
    else
      -- The common case touches only the ends: trim what expired, update or push the newest.
      if s.head > 1 then redis.call('LTRIM', key, s.head - 1, -1) end
      if s.set_last then
        local i = s.loaded
        redis.call('LSET', key, -1, string.format('%d %d', s.ts[i], s.amts[i]))
      end
      for _, i in ipairs(s.pushed) do
        redis.call('RPUSH', key, string.format('%d %d', s.ts[i], s.amts[i]))
      end
    end
    local newest = s.ts[#s.ts]
    if newest and #s.ts >= s.head then
      redis.call('PEXPIRE', key, floor((newest + w - now) / 1000) + 1)
    end
  elseif alg == 2 then
    if s.tat <= now then redis.call('DEL', key); return end
    redis.call('SET', key, string.format('%d', s.tat), 'PX', floor((s.tat - now) / 1000) + 1)
  else
    for _, m in ipairs(s.remove) do redis.call('ZREM', key, m) end
    for _, m in ipairs(s.add) do redis.call('ZADD', key, now + w, m) end
    if #s.add > 0 then redis.call('PEXPIRE', key, floor(w / 1000) + 1) end
  end
end

-- Main ---------------------------------------------------------------------------------------

local states, params, first = {}, {}, {}
for i = 1, n do
  local b = 4 + (i - 1) * 7
  local p = {
    alg = tonumber(ARGV[b + 1]), limit = tonumber(ARGV[b + 2]), w = tonumber(ARGV[b + 3]),
    burst = tonumber(ARGV[b + 4]), amount = tonumber(ARGV[b + 5]),
    placement = tonumber(ARGV[b + 6]), actual = tonumber(ARGV[b + 7]),
  }
  params[i] = p
  -- (An acquire never names a key twice: the client rejects that.)
  local seen = first[KEYS[i]]
  if seen then
    states[i] = states[seen]
  else
    first[KEYS[i]] = i
    states[i] = load(KEYS[i], p.alg)
  end
end

if mode == 's' then
  for i = 1, n do
    local p, s = params[i], states[i]
    adjust(s, p.alg, p.limit, p.w, p.placement, p.amount, p.actual)
  end
  for i = 1, n do
    if first[KEYS[i]] == i then store(KEYS[i], states[i], params[i].alg, params[i].w) end
  end
  if idem then redis.call('DEL', KEYS[#KEYS]) end
  return { 0 }
end

local denied, retry = -1, -1
if mode == 'a' then
  for i = 1, n do
    local p = params[i]
    local r = check(states[i], p.alg, p.limit, p.w, p.burst, p.amount)
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

local out = { denied, retry }
for i = 1, n do
  local p, s = params[i], states[i]
  local placement = 0
  if mode == 'a' and denied < 0 then
    placement = charge(s, p.alg, p.limit, p.w, p.amount, p.placement)
  end
  local limit, remaining, reset = peek(s, p.alg, p.limit, p.w, p.burst)
  out[#out + 1] = limit
  out[#out + 1] = remaining
  out[#out + 1] = reset
  out[#out + 1] = placement
  if mode == 'a' and denied < 0 and first[KEYS[i]] == i then
    store(KEYS[i], s, p.alg, p.w)
  end
end

if mode == 'a' and idem then
  local parts = {}
  for i = 1, #out do parts[i] = string.format('%d', out[i]) end
  redis.call('SET', KEYS[#KEYS], table.concat(parts, ','), 'PX', idem_ttl)
end
return out
