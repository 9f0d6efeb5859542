#!/usr/bin/env python3
"""End-to-end visibility lag: the time from a command's 2xx until its version is readable.

Opens one Server-Sent Event stream per product on cqrs-queryd (an event is sent the moment the
applied version is announced, i.e. readable), then sends AdjustStock commands at a paced rate
over keep-alive connections, round robin over the products. The lag of a command is the
arrival time of the first stream event at or above its version minus the time its 2xx came
back (0 when the event came first). Prints the achieved rate, p50/p99/max and anything that
never became visible. Standard library only.
"""
import argparse
import asyncio
import json
import time


async def http_request(reader, writer, method, path, body=None):
    head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\n"
    data = b""
    if body is not None:
        data = body.encode()
        head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    writer.write(head.encode() + b"\r\n" + data)
    await writer.drain()
    status_line = await reader.readline()
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        k, _, v = line.decode().partition(":")
        if k.lower() == "content-length":
            length = int(v)
    payload = await reader.readexactly(length) if length else b""
    return int(status_line.split()[1]), payload


async def stream(port, pid, seen, ready):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /v1/products/{pid}/stream HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
    await writer.drain()
    while True:
        line = await reader.readline()
        if not line:
            return
        if line.startswith(b"id: "):
            v = int(line[4:])
            seen.setdefault(pid, []).append((v, time.monotonic()))
            ready.add(pid)


async def sender(port, ids, rate, deadline, counter, t0, acks, errors):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = '{"delta":1,"reason":"visibility bench"}'
    while True:
        i = counter[0]
        counter[0] += 1
        at = t0 + i / rate
        if at >= deadline:
            break
        delay = at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        pid = ids[i % len(ids)]
        status, payload = await http_request(
            reader, writer, "POST", f"/v1/products/{pid}/stock-adjustments", body)
        now = time.monotonic()
        if 200 <= status < 300:
            acks.append((pid, json.loads(payload)["version"], now))
        else:
            errors.append(status)
    writer.close()


def pct(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--command-port", type=int, required=True)
    ap.add_argument("--query-port", type=int, required=True)
    ap.add_argument("--ids", required=True)
    ap.add_argument("--products", type=int, default=50)
    ap.add_argument("--rate", type=float, default=1000)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--connections", type=int, default=32)
    a = ap.parse_args()
    ids = [l.strip() for l in open(a.ids) if l.strip()][: a.products]
    seen, ready = {}, set()
    streams = [asyncio.create_task(stream(a.query_port, pid, seen, ready)) for pid in ids]
    for _ in range(100):
        if len(ready) == len(ids):
            break
        await asyncio.sleep(0.1)
    t0 = time.monotonic() + 0.2
    deadline = t0 + a.seconds
    counter, acks, errors = [0], [], []
    await asyncio.gather(*[
        sender(a.command_port, ids, a.rate, deadline, counter, t0, acks, errors)
        for _ in range(a.connections)])
    elapsed = time.monotonic() - t0
    await asyncio.sleep(3)  # the tail
    for s in streams:
        s.cancel()
    lags, missing = [], 0
    for pid, version, acked in acks:
        arrivals = [t for v, t in seen.get(pid, []) if v >= version]
        if not arrivals:
            missing += 1
            continue
        lags.append(max(0.0, min(arrivals) - acked) * 1000)
    print(f"commands: {len(acks)} acknowledged in {elapsed:.1f} s = {len(acks) / elapsed:.0f}/s "
          f"(target {a.rate:.0f}/s), errors {len(errors)}, over {len(ids)} products")
    print(f"visibility lag (ms): p50 {pct(lags, 50):.2f}  p99 {pct(lags, 99):.2f}  "
          f"max {max(lags) if lags else float('nan'):.2f}  never visible: {missing}")


asyncio.run(main())
