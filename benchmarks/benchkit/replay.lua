-- Replay the HTTP requests listed in a file, one request per line:
--   METHOD <tab> PATH <tab> HEADERS <tab> BODY
-- where HEADERS are "Name: value" pairs joined by the byte 0x1f.
-- Arguments after "--": the file, the number of threads, and "once" or "loop".
-- Thread i of n sends lines i, i + n, i + 2n, ... over its one connection
-- (run wrk with as many threads as connections). With "once" a thread stops
-- after its last line, so a one-time token is never sent twice (after a 503
-- response the same line is sent again); with "loop" it starts over. done() prints one line starting with WRK_RESULT and holding
-- JSON: counts, errors, latency percentiles, responses per status code, and
-- how many threads ran out of lines.
--
-- With the environment variable REPLAY_HONOUR_RETRY_AFTER=1, a connection
-- that gets 503 waits as long as its Retry-After header says before it sends
-- again, as a well-behaved client does. Without it, delay() stays undefined,
-- because wrk then puts every request through a timer.

local threads = {}
local created = 0

function setup(thread)
  thread:set("index", created)
  created = created + 1
  table.insert(threads, thread)
end

local function split(text, separator)
  local fields = {}
  local start = 1
  while true do
    local at = string.find(text, separator, start, true)
    if not at then
      table.insert(fields, string.sub(text, start))
      return fields
    end
    table.insert(fields, string.sub(text, start, at - 1))
    start = at + #separator
  end
end

local function parse_headers(text)
  local headers = {}
  if text == "" then
    return headers
  end
  for _, header in ipairs(split(text, "\31")) do
    local colon = string.find(header, ": ", 1, true)
    headers[string.sub(header, 1, colon - 1)] = string.sub(header, colon + 2)
  end
  return headers
end

function init(args)
  local path, count = args[1], tonumber(args[2])
  once = args[3] == "once"
  prepared = {}
  local number = 0
  for line in io.lines(path) do
    if number % count == index then
      local fields = split(line, "\t")
      table.insert(prepared, wrk.format(fields[1], fields[2], parse_headers(fields[3]), fields[4]))
    end
    number = number + 1
  end
  position = 0
  statuses = {}
  finished = 0
end

function request()
  position = position + 1
  if position > #prepared then
    position = 1
  end
  return prepared[position]
end

if os.getenv("REPLAY_HONOUR_RETRY_AFTER") == "1" then
  pause = 0

  function delay()
    local milliseconds = pause
    pause = 0
    return milliseconds
  end
end

function response(status, headers, body)
  local key = tostring(status)
  statuses[key] = (statuses[key] or 0) + 1
  if status == 503 and pause ~= nil then
    pause = 1000 * (tonumber(headers["Retry-After"]) or 1)
  end
  if once then
    if status == 503 then
      -- Every hashing slot was busy and the token is still unused: send it
      -- again.
      position = position - 1
    elseif position >= #prepared then
      finished = 1
      wrk.thread:stop()
    end
  end
end

function done(summary, latency, requests)
  local counts = {}
  local finished_threads = 0
  for _, thread in ipairs(threads) do
    for key, value in pairs(thread:get("statuses")) do
      counts[key] = (counts[key] or 0) + value
    end
    finished_threads = finished_threads + thread:get("finished")
  end
  local parts = {}
  for key, value in pairs(counts) do
    table.insert(parts, string.format('"%s": %d', key, value))
  end
  local errors = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests": %d, "duration_us": %d, "finished_threads": %d, '
      .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, '
      .. '"latency_us": {"p50": %d, "p90": %d, "p99": %d, "max": %d, "mean": %.1f}, '
      .. '"statuses": {%s}}\n',
    summary.requests, summary.duration, finished_threads,
    errors.connect, errors.read, errors.write, errors.status, errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean,
    table.concat(parts, ", ")))
end
