-- Admission control of the gateway: one EVALSHA checks and reserves every limit of a key
-- at once (all or nothing), one more settles the reservation after the response.
--
-- Time comes from Redis (TIME), never from the gateway hosts.
-- Rates (requests/min, tokens/min) use GCRA: a "theoretical arrival time" (TAT, integer
-- microseconds) per limit; a burst up to the limit is allowed and capacity returns smoothly.
-- All keys of one call share one hash tag (the tenant's, or the deployment's), so the script
-- also runs on Redis Cluster. Day/month counters are named from the declared key prefixes.
--
-- ARGV[1] is the operation: admit | peek | settle | cache | deploy_admit | deploy_leave |
-- deploy_queue | deploy_settle | headroom (read only).

local PERIOD = 60000000 -- one minute in microseconds

local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function fmt(x) return string.format('%.0f', x) end

-- civil date from days since 1970-01-01 (Howard Hinnant's algorithm), for month keys
local function civil(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  if m <= 2 then y = y + 1 end
  return y, m
end

-- GCRA check: returns allowed, new_tat, retry_after_us, remaining, reset_us
local function gcra(key, limit, cost, now, period)
  local PERIOD = period or PERIOD
  local interval = PERIOD / limit
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local new_tat = math.ceil(tat + cost * interval)
  local used = new_tat - now
  if used > PERIOD then
    return false, tat, used - PERIOD, math.max(0, math.floor((PERIOD - (tat - now)) / interval)), tat - now
  end
  return true, new_tat, 0, math.floor((PERIOD - used) / interval), used
end

local function store_tat(key, tat, now)
  redis.call('SET', key, fmt(tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
end

local function refund_tat(key, limit, tokens, now, period)
  -- tokens > 0 gives capacity back, < 0 consumes more (the answer was longer than reserved)
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat == 0 then return end
  local new_tat = math.ceil(tat - tokens * (period or PERIOD) / limit)
  if new_tat <= now then
    redis.call('DEL', key)
  else
    store_tat(key, new_tat, now)
  end
end

local function counter(key, seed)
  local v = redis.call('GET', key)
  if v then return tonumber(v), true end
  if seed ~= '' then return tonumber(seed), false end
  return nil, false
end

-- Waiters whose liveness expired (their worker died without leaving) leave the queue.
local function purge_queue(qkey, akey, now)
  local dead = redis.call('ZRANGEBYSCORE', akey, '-inf', now)
  for _, m in ipairs(dead) do redis.call('ZREM', qkey, m) end
  if #dead > 0 then redis.call('ZREMRANGEBYSCORE', akey, '-inf', now) end
end

local op = ARGV[1]

if op == 'admit' then
  -- KEYS: 1 rpm tat, 2 tpm tat, 3 day-tokens prefix, 4 lease zset, 5 key-spend prefix, 6 tenant-spend prefix
  -- ARGV: 2 request_id, 3 rpm, 4 tpm, 5 tokens, 6 daily limit, 7 max concurrent, 8 lease ms,
  --       9 key budget (nano-USD, -1 none), 10 tenant budget, 11 cost (nano-USD),
  --       12 seed key spend, 13 seed tenant spend, 14 seed day tokens ('' = none given)
  local now = now_us()
  local now_ms = math.floor(now / 1000)
  local rid = ARGV[2]
  local rpm, tpm, tokens = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
  local daily, maxc, lease_ms = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
  local kbudget, tbudget, cost = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
  local days = math.floor(now / 86400000000)
  local y, m = civil(days)
  local month = string.format('%04d%02d', y, m)
  local day_key = KEYS[3] .. ':' .. days
  local kspend_key = KEYS[5] .. ':' .. month
  local tspend_key = KEYS[6] .. ':' .. month
  local until_midnight = (days + 1) * 86400000 - now_ms

  -- counters that live for a day or a month must be seeded from the database when missing
  local day_used, kspent, tspent
  local missing = {}
  if daily > 0 then
    day_used = counter(day_key, ARGV[14])
    if day_used == nil then missing[#missing + 1] = 'day' end
  end
  if kbudget >= 0 then
    kspent = counter(kspend_key, ARGV[12])
    if kspent == nil then missing[#missing + 1] = 'key_spend' end
  end
  if tbudget >= 0 then
    tspent = counter(tspend_key, ARGV[13])
    if tspent == nil then missing[#missing + 1] = 'tenant_spend' end
  end
  if #missing > 0 then
    return {-1, table.concat(missing, ','), 0, days, month}
  end

  -- checks first, nothing written: all or nothing
  local rpm_ok, rpm_tat, rpm_retry, rpm_left, rpm_reset = true, 0, 0, -1, 0
  if rpm > 0 then
    rpm_ok, rpm_tat, rpm_retry, rpm_left, rpm_reset = gcra(KEYS[1], rpm, 1, now)
    if not rpm_ok then return {0, 'rpm', math.ceil(rpm_retry / 1000), days, month, rpm_left, math.ceil(rpm_reset / 1000)} end
  end
  local tpm_ok, tpm_tat, tpm_retry, tpm_left, tpm_reset = true, 0, 0, -1, 0
  if tpm > 0 then
    if tokens > tpm then return {0, 'tpm_too_large', 0, days, month} end
    tpm_ok, tpm_tat, tpm_retry, tpm_left, tpm_reset = gcra(KEYS[2], tpm, tokens, now)
    if not tpm_ok then return {0, 'tpm', math.ceil(tpm_retry / 1000), days, month, tpm_left, math.ceil(tpm_reset / 1000)} end
  end
  if daily > 0 then
    if tokens > daily then return {0, 'daily_too_large', 0, days, month} end
    if day_used + tokens > daily then return {0, 'daily', until_midnight, days, month} end
  end
  if maxc > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now_ms)
    if redis.call('ZCARD', KEYS[4]) >= maxc then return {0, 'concurrency', 1000, days, month} end
  end
  if kbudget >= 0 and kspent + cost > kbudget then return {0, 'key_budget', 0, days, month} end
  if tbudget >= 0 and tspent + cost > tbudget then return {0, 'tenant_budget', 0, days, month} end

  -- all limits say yes: reserve everything
  if rpm > 0 then store_tat(KEYS[1], rpm_tat, now) end
  if tpm > 0 then store_tat(KEYS[2], tpm_tat, now) end
  if daily > 0 then redis.call('SET', day_key, fmt(day_used + tokens), 'PX', until_midnight + 86400000) end
  if maxc > 0 then
    redis.call('ZADD', KEYS[4], now_ms + lease_ms, rid)
    redis.call('PEXPIRE', KEYS[4], lease_ms + 1000)
  end
  local month_ttl = 40 * 86400000
  if kbudget >= 0 then redis.call('SET', kspend_key, fmt(kspent + cost), 'PX', month_ttl) end
  if tbudget >= 0 then redis.call('SET', tspend_key, fmt(tspent + cost), 'PX', month_ttl) end
  return {1, '', 0, days, month, rpm_left, math.ceil(rpm_reset / 1000), tpm_left, math.ceil(tpm_reset / 1000)}

elseif op == 'peek' then
  -- Would a request be refused on requests/min or concurrency alone? Reads only, reserves
  -- nothing: lets the gateway refuse before counting a prompt. KEYS as for admit.
  -- ARGV: 2 rpm, 3 max concurrent
  local now = now_us()
  local rpm, maxc = tonumber(ARGV[2]), tonumber(ARGV[3])
  if rpm > 0 then
    local ok, _, retry, left, reset = gcra(KEYS[1], rpm, 1, now)
    if not ok then return {0, 'rpm', math.ceil(retry / 1000), left, math.ceil(reset / 1000)} end
  end
  if maxc > 0 and redis.call('ZCOUNT', KEYS[4], '(' .. fmt(math.floor(now / 1000)), '+inf') >= maxc then
    return {0, 'concurrency', 1000, 0, 0}
  end
  return {1, '', 0, 0, 0}

elseif op == 'cache' then
  -- The response cache's lookup and, on a hit, the hit's admission, in one round trip
  -- (app/services/response_cache.py). A hit is answered at once: it takes no concurrency
  -- slot and reserves no tokens or money, it counts against requests/min only.
  -- KEYS: 1-6 as for admit, 7 the tenant's cache generations (hash), 8 the prefix of its entries.
  -- ARGV: 2 rpm (0: none), 3 model alias, 4 digest, 5 '1' to read the entry.
  -- Returns {status, reason, retry ms, tenant gen, model gen, entry, rpm left, rpm reset ms}:
  -- status 2 no entry (nothing counted: the miss is admitted as usual), 1 a hit admitted
  -- (counted), 0 a hit refused on requests/min (nothing counted).
  local g = redis.call('HMGET', KEYS[7], '*', ARGV[3])
  local tg, mg = g[1] or '0', g[2] or '0'
  if ARGV[5] ~= '1' then return {2, '', 0, tg, mg, false, -1, 0} end
  local entry = redis.call('GET', KEYS[8] .. ':' .. tg .. ':' .. mg .. ':' .. ARGV[4])
  if not entry then return {2, '', 0, tg, mg, false, -1, 0} end
  local rpm = tonumber(ARGV[2])
  if rpm <= 0 then return {1, '', 0, tg, mg, entry, -1, 0} end
  local now = now_us()
  local ok, tat, retry, left, reset = gcra(KEYS[1], rpm, 1, now)
  if not ok then return {0, 'rpm', math.ceil(retry / 1000), tg, mg, entry, left, math.ceil(reset / 1000)} end
  store_tat(KEYS[1], tat, now)
  return {1, '', 0, tg, mg, entry, left, math.ceil(reset / 1000)}

elseif op == 'settle' then
  -- KEYS as for admit. ARGV: 2 request_id, 3 tpm, 4 token delta (reserved - actual),
  --   5 day (epoch days of the admission), 6 month, 7 cost delta (actual - reserved, nano-USD),
  --   8 daily limited (1/0), 9 key budgeted (1/0), 10 tenant budgeted (1/0)
  local now = now_us()
  local tpm, token_refund = tonumber(ARGV[3]), tonumber(ARGV[4])
  if tpm > 0 and token_refund ~= 0 then refund_tat(KEYS[2], tpm, token_refund, now) end
  local function adjust(key, delta)
    if delta ~= 0 and redis.call('EXISTS', key) == 1 then
      local v = tonumber(redis.call('GET', key)) + delta
      if v < 0 then v = 0 end
      redis.call('SET', key, fmt(v), 'KEEPTTL')
    end
  end
  if ARGV[8] == '1' then adjust(KEYS[3] .. ':' .. ARGV[5], -token_refund) end
  local cost_delta = tonumber(ARGV[7])
  if ARGV[9] == '1' then adjust(KEYS[5] .. ':' .. ARGV[6], cost_delta) end
  if ARGV[10] == '1' then adjust(KEYS[6] .. ':' .. ARGV[6], cost_delta) end
  redis.call('ZREM', KEYS[4], ARGV[2])
  return 1

elseif op == 'deploy_admit' then
  -- A provider quota of one deployment, with its fair queue of waiting requests.
  -- KEYS: 1 request log (zset of admission times: a sliding window, so no window of
  -- `window` microseconds ever holds more than rpm requests), 2 tpm tat, 3 day-requests prefix,
  -- 4 queue (zset ticket -> enqueue time), 5 queue liveness (zset ticket -> expiry).
  -- ARGV: 2 rpm, 3 tpm, 4 rpd, 5 tokens, 6 window us, 7 ticket ('' = a newcomer that does not
  -- queue), 8 liveness us of a queued ticket.
  -- Waiters are served in enqueue order: a request ranked r (r waiters before it; a newcomer
  -- ranks behind all of them) may take a slot only while more than r slots are free.
  -- Returns {1, ''} or {0, reason, wait us until this rank's slot frees, rank, queue length}.
  local now = now_us()
  local rpm, tpm, rpd, tokens = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
  local window, ticket = tonumber(ARGV[6]), ARGV[7]
  purge_queue(KEYS[4], KEYS[5], now)
  local qlen = redis.call('ZCARD', KEYS[4])
  local rank, queued = qlen, false
  if ticket ~= '' then
    local r = redis.call('ZRANK', KEYS[4], ticket)
    if r then rank, queued = r, true end
  end
  local days = math.floor(now / 86400000000)
  local day_key = KEYS[3] .. ':' .. days
  local reason, wait, t_tat = nil, 0, 0
  if rpm > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
    local free = rpm - redis.call('ZCARD', KEYS[1])
    if rank >= free then
      reason = 'rpm'
      local e = redis.call('ZRANGE', KEYS[1], rank - free, rank - free, 'WITHSCORES')
      wait = e[2] and (tonumber(e[2]) + window - now) or window
    end
  end
  if not reason and rpd > 0 then
    local free = rpd - tonumber(redis.call('GET', day_key) or '0')
    if rank >= free then reason, wait = 'rpd', (days + 1) * 86400000000 - now end
  end
  if not reason and tpm > 0 then
    local ok, new_tat, retry = gcra(KEYS[2], tpm, math.min(tokens, tpm), now, window)
    if not ok then reason, wait = 'tpm', retry
    elseif rpm == 0 and rpd == 0 and rank > 0 then reason, wait = 'queued', 0
    else t_tat = new_tat end
  end
  if reason then
    if ticket ~= '' then
      if not queued then
        redis.call('ZADD', KEYS[4], now, ticket)
        qlen = qlen + 1
      end
      redis.call('ZADD', KEYS[5], now + tonumber(ARGV[8]), ticket)
      redis.call('PEXPIRE', KEYS[4], 86400000)
      redis.call('PEXPIRE', KEYS[5], 86400000)
    end
    return {0, reason, fmt(wait), rank, qlen}
  end
  if rpm > 0 then
    local seq = redis.call('INCR', KEYS[1] .. ':seq')
    redis.call('ZADD', KEYS[1], now, fmt(now) .. ':' .. seq)
    redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000) + 1000)
  end
  if tpm > 0 then store_tat(KEYS[2], t_tat, now) end
  if rpd > 0 then
    redis.call('INCR', day_key)
    redis.call('PEXPIRE', day_key, 2 * 86400000)
  end
  if queued then
    redis.call('ZREM', KEYS[4], ticket)
    redis.call('ZREM', KEYS[5], ticket)
  end
  return {1, ''}

elseif op == 'deploy_leave' then
  -- A waiter gives up (timeout, client gone). KEYS: 4 queue, 5 liveness. ARGV: 7 ticket
  redis.call('ZREM', KEYS[4], ARGV[7])
  redis.call('ZREM', KEYS[5], ARGV[7])
  return 1

elseif op == 'deploy_queue' then
  -- The queue's length and its oldest waiter's wait in us. KEYS: 4 queue, 5 liveness
  local now = now_us()
  purge_queue(KEYS[4], KEYS[5], now)
  local head = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
  local oldest = head[2] and fmt(now - tonumber(head[2])) or '0'
  return {redis.call('ZCARD', KEYS[4]), oldest}

elseif op == 'deploy_settle' then
  -- KEYS: 2 tpm tat of the deployment. ARGV: 2 tpm, 3 token refund, 4 window us
  local tpm, refund = tonumber(ARGV[2]), tonumber(ARGV[3])
  if tpm > 0 and refund ~= 0 then
    refund_tat(KEYS[2], tpm, math.min(refund, tpm), now_us(), tonumber(ARGV[4]))
  end
  return 1
elseif op == 'headroom' then
  -- Read-only view of a key's counters (GET /v1/key): nothing is reserved or written.
  -- KEYS as for admit. ARGV: 2 rpm, 3 tpm.
  -- Returns: days, month, rpm_left, rpm_reset_ms, tpm_left, tpm_reset_ms, in_flight,
  --          day tokens, key spend, tenant spend (counters: '' when Redis has none).
  local now = now_us()
  local now_ms = math.floor(now / 1000)
  local days = math.floor(now / 86400000000)
  local y, m = civil(days)
  local month = string.format('%04d%02d', y, m)
  local function headroom(key, limit)
    if limit <= 0 then return -1, 0 end
    local _, _, _, left, reset_us = gcra(key, limit, 0, now)  -- a request of cost 0: a pure read
    return left, math.ceil(reset_us / 1000)
  end
  local rpm_left, rpm_reset = headroom(KEYS[1], tonumber(ARGV[2]))
  local tpm_left, tpm_reset = headroom(KEYS[2], tonumber(ARGV[3]))
  local in_flight = redis.call('ZCOUNT', KEYS[4], '(' .. now_ms, '+inf')
  return {days, month, rpm_left, rpm_reset, tpm_left, tpm_reset, in_flight,
          redis.call('GET', KEYS[3] .. ':' .. days) or '',
          redis.call('GET', KEYS[5] .. ':' .. month) or '',
          redis.call('GET', KEYS[6] .. ':' .. month) or ''}
end

return redis.error_reply('unknown limiter operation ' .. tostring(op))
