"""The client side of each workload: one bounded subprocess, its output parsed into figures.

A workload returns a dict of figures, or raises `WorkloadFailed` with what the client
said, so a failure is recorded as a failed sample rather than a number.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import time
from dataclasses import dataclass


class WorkloadFailed(Exception):
    """The client failed, timed out, or printed nothing parseable."""


@dataclass(frozen=True)
class Redis:
    """A redis-benchmark workload: which test, how many clients, keepalive or a connection per request."""

    name: str
    test: str  # one redis-benchmark test, or several, comma-separated
    clients: int
    keepalive: bool = True
    one_cpu: bool = False  # client, front, elements and redis-server all on one CPU
    pipeline: int = 1      # redis-benchmark -P: requests each client sends before reading replies

    def argv(self, port: int, requests: int, cpu: int = 0) -> list[str]:
        pin = ["taskset", "-c", str(cpu)] if self.one_cpu else []
        return [*pin, "redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", self.test, "-c", str(self.clients),
                "-n", str(requests), "-k", "1" if self.keepalive else "0", "-P", str(self.pipeline), "--csv"]


GET1 = Redis("get1", "get", 1)
GET1_ONE_CPU = Redis("get1cpu", "get", 1, one_cpu=True)
GET50 = Redis("get50", "get", 50)
CHURN = Redis("churn", "ping_inline", 10, keepalive=False)
# issue 15's guard workload: pipelined commands a guard must frame across chunk boundaries
PIPELINED = Redis("pipe16", "set,get,lpush,lrange_100,mset", 50, pipeline=16)
REDIS_WORKLOADS = (GET1, GET1_ONE_CPU, GET50, CHURN, PIPELINED)


def _run(argv: list[str], timeout: float) -> tuple[str, float]:
    started = time.monotonic()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as expired:
        out = (expired.stdout or b"")[-2000:] if isinstance(expired.stdout, bytes) else (expired.stdout or "")[-2000:]
        raise WorkloadFailed(f"timed out after {timeout:.0f}s: {' '.join(argv)}\n{out}") from None
    elapsed = time.monotonic() - started
    if done.returncode != 0:
        raise WorkloadFailed(f"exit {done.returncode}: {' '.join(argv)}\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done.stdout, elapsed


def iperf3(port: int, seconds: int, reverse: bool) -> dict[str, float]:
    """Gb/s received by the receiving side (sum_received), client->server, or server->client with -R."""
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J", "--connect-timeout", "3000"]
    if reverse:
        argv.append("-R")
    try:
        out, elapsed = _run(argv, timeout=seconds + 20)
    except WorkloadFailed as failed:
        raise WorkloadFailed(_iperf_error(str(failed)) or str(failed)) from None
    try:
        result = json.loads(out)
    except json.JSONDecodeError:
        raise WorkloadFailed(f"iperf3 printed no JSON:\n{out[-2000:]}") from None
    if "error" in result:
        raise WorkloadFailed(f"iperf3: {result['error']}")
    end = result["end"]
    return {
        "gbps": end["sum_received"]["bits_per_second"] / 1e9,
        "sent_gbps": end["sum_sent"]["bits_per_second"] / 1e9,
        "retransmits": end["sum_sent"].get("retransmits", 0),
        "client_cpu_pct": end.get("cpu_utilization_percent", {}).get("host_total", 0.0),
        "server_cpu_pct": end.get("cpu_utilization_percent", {}).get("remote_total", 0.0),
        "elapsed_s": elapsed,
    }


def _iperf_error(message: str) -> str | None:
    """iperf3 -J exits non-zero with its error inside the JSON; pull it out."""
    start = message.find("{")
    if start < 0:
        return None
    try:
        return "iperf3: " + json.loads(message[start:message.rfind("}") + 1]).get("error", "")
    except json.JSONDecodeError:
        return None


AB_CLIENTS = 50


def ab(port: int, requests: int, timeout: float) -> dict[str, float]:
    """`ab -c 50` without keep-alive (apache2-utils): a new connection per request, the set-up
    cost a chatty HTTP/1.0 client pays; req/s and the median time per request (ms)."""
    out, elapsed = _run(["ab", "-q", "-n", str(requests), "-c", str(AB_CLIENTS), "-s", "10",
                         f"http://127.0.0.1:{port}/"], timeout)
    figures: dict[str, float] = {"requests": requests, "elapsed_s": elapsed}
    for line in out.splitlines():
        words = line.split()
        if line.startswith("Requests per second:"):
            figures["rps"] = float(words[3])
        elif line.startswith("Failed requests:"):
            figures["failed"] = float(words[2])
        elif line.startswith("Non-2xx responses:"):
            figures["non2xx"] = float(words[2])
        elif len(words) == 2 and words[0] == "50%":
            figures["p50"] = float(words[1])
    if "rps" not in figures:
        raise WorkloadFailed(f"unexpected ab output:\n{out[-2000:]}")
    if figures.get("failed") or figures.get("non2xx"):
        raise WorkloadFailed(f"ab: {figures.get('failed', 0):.0f} failed, {figures.get('non2xx', 0):.0f} non-2xx "
                             f"of {requests} requests")
    return figures


def redis_benchmark(workload: Redis, port: int, requests: int, timeout: float, cpu: int = 0) -> dict[str, float]:
    """req/s and latency percentiles (ms) from redis-benchmark --csv (redis 7 columns). redis-benchmark 7
    exits non-zero at the first error reply, so figures mean every reply was a good one.

    With several tests (`set,get,...`), each test's figures are prefixed with its name (`set_rps`), the
    LPUSH run that only fills LRANGE's list is left out, and `rps` is their combined rate (one request
    of each in turn), so that -n sized by it makes the whole run last as long as one test would."""
    out, elapsed = _run(workload.argv(port, requests, cpu), timeout)
    rows = [row for row in csv.DictReader(io.StringIO(out)) if "needed" not in row.get("test", "")]
    if len(rows) != len(workload.test.split(",")) or not all("rps" in row for row in rows):
        raise WorkloadFailed(f"unexpected redis-benchmark output:\n{out[-2000:]}")
    try:
        per_test = [{key.removesuffix("_latency_ms"): float(value) for key, value in row.items() if key != "test"}
                    for row in rows]
    except ValueError:
        raise WorkloadFailed(f"unparseable redis-benchmark rows: {rows}") from None
    if any(test["rps"] <= 0 for test in per_test):
        raise WorkloadFailed(f"redis-benchmark reported no requests per second: {rows}")
    if len(rows) == 1:
        figures = per_test[0]
    else:
        names = [row["test"].split()[0].lower() for row in rows]
        figures = {f"{name}_{key}": value for name, test in zip(names, per_test) for key, value in test.items()}
        figures["rps"] = 1 / sum(1 / test["rps"] for test in per_test)
    figures["requests"] = requests
    figures["elapsed_s"] = elapsed
    return figures
