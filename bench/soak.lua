-- wrk script for bench/soak.py. Each request carries a fresh X-Request-ID
-- (the gateway keeps it, the soak's upstream echoes it in its body), and each
-- response is counted per 100 ms of wall-clock time by status and kind, so
-- it can be judged against the fault in progress when it arrived. A 200
-- whose body names another request's ID is a "mismatch": a response given
-- to the wrong request.
-- Usage: wrk ... -s soak.lua URL -- <id prefix>
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_usec; } soak_timeval;
int gettimeofday(soak_timeval *tv, void *tz);
]]
local tv = ffi.new("soak_timeval")
local threads = {}
local prefix, sent, headers_out = "soak", 0, {}

function setup(thread)
  thread:set("thread_no", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  counts = {}
  prefix = (args[1] or "soak") .. "-" .. tostring(thread_no or 1) .. "-"
  for k, v in pairs(wrk.headers) do headers_out[k] = v end
end

function request()
  sent = sent + 1
  headers_out["X-Request-ID"] = prefix .. sent
  return wrk.format(nil, nil, headers_out)
end

local function header(headers, wanted)
  for k, v in pairs(headers) do
    if string.lower(k) == wanted then return v end
  end
  return nil
end

-- The gateway's JSON error sentences (apigw/upstream.py, service.py,
-- ratelimit.py) say which part failed.
local function kind(status, headers, body)
  if status < 400 then
    local rid = header(headers, "x-request-id")
    if status == 200 and (rid == nil or not body:find('"rid":"' .. rid .. '"', 1, true)) then
      return "mismatch"
    end
    return "-"
  end
  if body:find("circuit open", 1, true) then return "breaker" end
  if body:find("key store", 1, true) then return "keystore" end
  if body:find("rate limiter", 1, true) then return "limiter" end
  if body:find("rate limit exceeded", 1, true) then return "limited" end
  if body:find("did not answer", 1, true) then return "timeout" end
  if body:find("unreachable", 1, true) then return "unreachable" end
  if body:find("API key", 1, true) then return "auth" end
  return "other"
end

function response(status, headers, body)
  ffi.C.gettimeofday(tv, nil)
  local slice = tonumber(tv.tv_sec) * 10 + math.floor(tonumber(tv.tv_usec) / 100000)
  local k = slice .. " " .. status .. " " .. kind(status, headers, body)
  counts[k] = (counts[k] or 0) + 1
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("SOAK_SUMMARY %d %d %d %d %d %d %d %d\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status,
    e.timeout, latency.max))
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("counts")) do
      io.write("SOAK ", k, " ", v, "\n")
    end
  end
end
