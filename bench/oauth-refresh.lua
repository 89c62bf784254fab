-- wrk: the refresh grant, one token family per thread (one connection each): every response
-- carries the next refresh token, which the next request presents (rotation on every use).
local threads = {}
local counter = 1

function setup(thread)
  local tokens = {}
  for t in string.gmatch(os.getenv("REFRESH"), "%S+") do table.insert(tokens, t) end
  thread:set("rt", tokens[counter])
  thread:set("client_id", os.getenv("CLIENT_ID"))
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  failures = 0
end

function request()
  return wrk.format("POST", "/oauth/token",
    { ["Content-Type"] = "application/x-www-form-urlencoded" },
    "grant_type=refresh_token&client_id=" .. client_id .. "&refresh_token=" .. rt)
end

function response(status, headers, body)
  if status == 200 then
    rt = string.match(body, '"refresh_token":"([^"]+)"')
  else
    failures = failures + 1
  end
end

function done(summary, latency, requests)
  local f = 0
  for _, t in ipairs(threads) do f = f + t:get("failures") end
  io.write(string.format("refresh failures: %d\n", f))
end
