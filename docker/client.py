"""The demo client of the compose stack: proves what each element did to real traffic.

    python /demo/client.py --target app:7000 --name app --direction inbound

Dials the target (a line server, docker/app.py, that answers `<name> got: <line>`)
once per case, sends one line, half-closes and reads the reply to the end:

    rewrite   "hello world"                  expects "<name> got: howdy world"
    firewall  "SELECT 1; DROP TABLE users;"  expects a connection reset, no reply
    pass      "just passing through"         expects "<name> got: just passing through"

Before the cases it probes with "ping" until a reply comes back (the sidecar may still
be starting). `--repeat N` then makes N more "pass" connections, so a scaled element
(`docker-compose up --scale firewall=3`) has connections to spread over its replicas,
and prints one line for them. Prints one JSON object per case (with the client's own address, which the
logger element logs as the connection's client) and exits 1 if any case was not as
expected. In the compose stack `client` dials the app from outside (inbound: the app's
PREROUTING rules send it to the proxy's port 15006) and `egress-client` runs inside
the app's network namespace and dials `upstream` (outbound: OUTPUT rules, port 15002).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import sys
import time

CASES = (
    ("rewrite", "hello world", "reply", "howdy world"),
    ("firewall", "SELECT 1; DROP TABLE users;", "reset", None),
    ("pass", "just passing through", "reply", "just passing through"),
)


async def exchange(host: str, port: int, line: str, timeout: float) -> dict:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    local = writer.get_extra_info("sockname")
    result = {"client": f"{local[0]}:{local[1]}", "outcome": "reply", "reply": ""}
    data = b""
    try:
        writer.write(line.encode() + b"\n")
        await writer.drain()
        writer.write_eof()
        data = await asyncio.wait_for(reader.read(), timeout)
        result["outcome"] = "reply" if data else "eof"
    except TimeoutError:  # before OSError: TimeoutError is one
        result["outcome"] = "timeout"
    except OSError as error:
        # An RST can land before the half-close (ENOTCONN from shutdown), during a write
        # (EPIPE) or during the read (ECONNRESET): all three are the connection reset.
        if error.errno not in (errno.ECONNRESET, errno.ENOTCONN, errno.EPIPE):
            raise
        result["outcome"] = "reset"
    finally:
        writer.close()
    result["reply"] = data.decode(errors="replace").strip()
    return result


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="HOST:PORT of the line server")
    parser.add_argument("--name", required=True, help="the server's reply prefix (its --name)")
    parser.add_argument("--direction", required=True, choices=["inbound", "outbound"], help="label for the output")
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--ready-timeout", type=float, default=30.0)
    parser.add_argument("--repeat", type=int, default=0, help="more pass connections after the cases")
    args = parser.parse_args()
    host, port = args.target.rsplit(":", 1)

    deadline = time.monotonic() + args.ready_timeout
    attempts = 0
    while True:
        attempts += 1
        try:
            probe = await exchange(host, int(port), "ping", args.timeout)
        except OSError as error:
            probe = {"outcome": f"{type(error).__name__}: {error}", "reply": ""}
        if probe["reply"] == f"{args.name} got: ping":
            break
        if time.monotonic() > deadline:
            report = {"direction": args.direction, "case": "ready", "ok": False, "attempts": attempts, **probe}
            print(json.dumps(report), flush=True)
            return 1
        await asyncio.sleep(0.2)
    print(json.dumps({"direction": args.direction, "case": "ready", "ok": True, "attempts": attempts}), flush=True)

    failed = 0
    for case, line, outcome, reply in CASES:
        result = await exchange(host, int(port), line, args.timeout)
        expected = {"outcome": outcome, "reply": f"{args.name} got: {reply}" if reply else ""}
        ok = result["outcome"] == expected["outcome"] and result["reply"] == expected["reply"]
        failed += not ok
        print(json.dumps({"direction": args.direction, "case": case, "sent": line, "ok": ok, **result,
                          "expected": expected}), flush=True)
    print(f"client ({args.direction}): {len(CASES) - failed} of {len(CASES)} cases as expected", flush=True)
    if args.repeat:
        _, line, _, reply = CASES[-1]
        results = [await exchange(host, int(port), line, args.timeout) for _ in range(args.repeat)]
        passed = sum(r["outcome"] == "reply" and r["reply"] == f"{args.name} got: {reply}" for r in results)
        failed += passed != args.repeat
        print(f"client ({args.direction}): {passed} of {args.repeat} repeated pass connections as expected",
              flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
