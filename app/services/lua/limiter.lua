-- Admission control of the gateway: one EVALSHA checks and reserves every limit of a key
-- at once (all or nothing), one more settles the reservation after the response.
--
-- Time comes from Redis (TIME), never from the gateway hosts.
-- Rates (requests/min, tokens/min) use GCRA: a "theoretical arrival time" (TAT, integer
-- microseconds) per limit; a burst up to the limit is allowed and capacity returns smoothly.
-- All keys of one call share one hash tag (the tenant's, or the deployment's), so the script
-- also runs on Redis Cluster. Day/month counters are named from the declared key prefixes.
--
-- ARGV[1] is the operation: admit | peek | settle | deploy_admit | deploy_settle.

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
local function gcra(key, limit, cost, now)
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

local function refund_tat(key, limit, tokens, now)
  -- tokens > 0 gives capacity back, < 0 consumes more (the answer was longer than reserved)
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat == 0 then return end
  local new_tat = math.ceil(tat - tokens * PERIOD / limit)
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
  -- A provider quota of one deployment. KEYS: 1 rpm tat, 2 tpm tat, 3 day-requests prefix.
  -- ARGV: 2 rpm, 3 tpm, 4 rpd, 5 tokens
  local now = now_us()
  local rpm, tpm, rpd, tokens = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
  local days = math.floor(now / 86400000000)
  local day_key = KEYS[3] .. ':' .. days
  local r_ok, r_tat, t_ok, t_tat
  if rpm > 0 then
    r_ok, r_tat = gcra(KEYS[1], rpm, 1, now)
    if not r_ok then return {0, 'rpm'} end
  end
  if tpm > 0 then
    t_ok, t_tat = gcra(KEYS[2], tpm, math.min(tokens, tpm), now)
    if not t_ok then return {0, 'tpm'} end
  end
  if rpd > 0 and tonumber(redis.call('GET', day_key) or '0') >= rpd then return {0, 'rpd'} end
  if rpm > 0 then store_tat(KEYS[1], r_tat, now) end
  if tpm > 0 then store_tat(KEYS[2], t_tat, now) end
  if rpd > 0 then
    redis.call('INCR', day_key)
    redis.call('PEXPIRE', day_key, 2 * 86400000)
  end
  return {1, ''}

elseif op == 'deploy_settle' then
  -- KEYS: 2 tpm tat of the deployment. ARGV: 2 tpm, 3 token refund
  local tpm, refund = tonumber(ARGV[2]), tonumber(ARGV[3])
  if tpm > 0 and refund ~= 0 then refund_tat(KEYS[2], tpm, math.min(refund, tpm), now_us()) end
  return 1
end

return redis.error_reply('unknown limiter operation ' .. tostring(op))
