-- wrk script: AdjustStock (+1) on a random product of the bench set.
-- The ids come from the file named by the BENCH_IDS environment variable, one per line.
local ids = {}
for line in io.lines(os.getenv("BENCH_IDS")) do ids[#ids + 1] = line end
local body = '{"delta":1,"reason":"bench"}'
local headers = {["Content-Type"] = "application/json"}

request = function()
    local id = ids[math.random(#ids)]
    return wrk.format("POST", "/v1/products/" .. id .. "/stock-adjustments", headers, body)
end

local statuses = {}
response = function(status)
    statuses[status] = (statuses[status] or 0) + 1
end

done = function(summary, latency, requests)
    io.write(string.format("non-2xx: %d\n", summary.errors.status))
    io.write(string.format("p50 %.2f ms, p99 %.2f ms\n", latency:percentile(50) / 1000,
        latency:percentile(99) / 1000))
end
