-- wrk script: POST /infer with one sequence per request, its length uniform in
-- [min_len, max_len] and its ids uniform in [low_id, high_id), from 256 bodies prepared
-- up front (so the load generator spends no time building them). Prints one JSON line.
-- usage: wrk -s bench/bodies.lua URL -- min_len max_len low_id high_id seed

local prepared = {}
local next_index = 1

function init(args)
  local min_len, max_len = tonumber(args[1]), tonumber(args[2])
  local low_id, high_id = tonumber(args[3]), tonumber(args[4])
  math.randomseed(tonumber(args[5]) + wrk.thread:get("id"))
  local headers = {["Content-Type"] = "application/json"}
  for i = 1, 256 do
    local ids = {}
    for t = 1, math.random(min_len, max_len) do
      ids[t] = math.random(low_id, high_id - 1)
    end
    local body = '{"sequences":[[' .. table.concat(ids, ",") .. ']]}'
    prepared[i] = wrk.format("POST", "/infer", headers, body)
  end
  next_index = math.random(1, #prepared)
end

function setup(thread)
  thread:set("id", thread_count or 0)
  thread_count = (thread_count or 0) + 1
end

function request()
  local r = prepared[next_index]
  next_index = next_index % #prepared + 1
  return r
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f}}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
