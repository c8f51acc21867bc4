"""element-proxy benchmark: one command, real servers, haproxy as the peer, medians and ratios.

    python bench/run.py [--quick] [--repeat N] [--json PATH] [--setups a,b,...]

Starts iperf3 and redis-server once, every set-up once (direct, haproxy, a minimal uvloop
forwarder, element-proxy with an empty chain, one and three passthrough elements, one
observe-mode element),
then runs each workload on each set-up, round-robin over the set-ups within each
repetition (the order rotates per repetition) so drift hits all alike. Prints a
Markdown table of medians with ratios against haproxy and issue 4's targets, and
writes every raw sample to JSON. Everything it starts is stopped by PID, also on
Ctrl-C or failure. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import idle, report  # noqa: E402
from bench.procs import (REPO, Procs, children_cpu_seconds, cpu_seconds, machine_busy_seconds,  # noqa: E402
                         open_connections, set_affinity, time_wait_sockets)
from bench.setups import CHAINS, KNOWN_SETUPS, SETUPS, Front, Setup, Stack  # noqa: E402
from bench.workloads import REDIS_WORKLOADS, Redis, WorkloadFailed, ab, iperf3, redis_benchmark  # noqa: E402

IDLE_CONNECTIONS = 10_000
CALIBRATION_REQUESTS = {"get1": 1000, "get1cpu": 1000, "get50": 5000, "churn": 1000, "pipe16": 20000, "ab50": 2000}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python bench/run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="short run (one repetition, 2 s bulk, ~1 s per redis run): under 3 minutes")
    parser.add_argument("--repeat", type=int, help="repetitions (default 3, 1 with --quick)")
    parser.add_argument("--bulk-seconds", type=int, help="iperf3 -t (default 3, 2 with --quick)")
    parser.add_argument("--redis-seconds", type=float,
                        help="target length of one redis-benchmark run; -n is sized from a calibration run "
                             "(default 2.5, 1 with --quick)")
    parser.add_argument("--setups", default=",".join(SETUPS),
                        help=f"comma-separated subset of {','.join(KNOWN_SETUPS)} (default: all but pass1x2, "
                             "which needs root)")
    parser.add_argument("--idle-connections", type=int, default=IDLE_CONNECTIONS,
                        help="idle connections to hold open through the empty proxy and haproxy "
                             "(default %(default)s; 0 skips; capped by RLIMIT_NOFILE)")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                        help="before each sample, wait up to S seconds until processes the bench did not start "
                             "use under 0.25 CPU (for a shared machine; default 0: only record their load)")
    parser.add_argument("--json", type=Path, help="where to write the raw samples (default: bench/results/<time>.json)")
    return parser


class Bench:
    """One benchmark run: the stack, the schedule, the samples."""

    def __init__(self, args: argparse.Namespace, stack: Stack, setups: list[str]) -> None:
        self.args = args
        self.stack = stack
        self.setups = setups
        self.samples: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []
        self.requests: dict[tuple[str, str], int] = {}
        self.cpus = os.sched_getaffinity(0)

    # one sample ---------------------------------------------------------------
    def sample(self, rep: int, setup: Setup, workload: str, target: str, run: Any) -> dict[str, Any]:
        """Runs one workload against one set-up; a client failure or a dead process is a failed sample."""
        front = setup.fronts[target]
        watched = ([front.proc] if front.proc else []) + front.elements
        cpu_before = {proc.name: cpu_seconds(proc.pid) for proc in watched if proc.alive()}
        record: dict[str, Any] = {"rep": rep, "setup": setup.name, "workload": workload, "target": target,
                                  "time": time.time(), "figures": {}}
        if workload == "churn":
            record["time_wait_before"] = time_wait_sockets()
        if self.args.wait_quiet:
            record["waited_for_quiet_s"] = self.wait_quiet()
        load_before = self._our_cpu(), machine_busy_seconds(), time.monotonic()
        try:
            record["figures"] = run(front.port)
        except WorkloadFailed as failed:
            record["error"] = str(failed)
        ours, busy, wall = (after - before for after, before in zip(
            (self._our_cpu(), machine_busy_seconds(), time.monotonic()), load_before))
        # CPU that processes the benchmark did not start used meanwhile, in CPUs: noise to report
        record["other_load_cpus"] = max(busy - ours, 0.0) / wall
        dead = [proc for proc in watched if not proc.alive()]
        if dead:
            record["error"] = (record.get("error", "") + "\n" if record.get("error") else "") + \
                "died: " + ", ".join(f"{proc.name} (exit {proc.popen.returncode})" for proc in dead)
        else:
            record["cpu_s"] = {name: cpu_seconds(proc.pid) - cpu_before[name]
                               for proc in watched for name in [proc.name] if name in cpu_before}
        self.samples.append(record)
        if "error" in record:
            self._failed(record, front, dead)
        return record

    def other_load(self, window: float = 0.3) -> float:
        """CPUs busy with processes the benchmark did not start, over a short window."""
        ours, busy, wall = self._our_cpu(), machine_busy_seconds(), time.monotonic()
        time.sleep(window)
        other = (machine_busy_seconds() - busy) - (self._our_cpu() - ours)
        return max(other, 0.0) / (time.monotonic() - wall)

    def wait_quiet(self) -> float:
        """With --wait-quiet S: waits up to S seconds for other processes to use under 0.25 CPU."""
        started = time.monotonic()
        while self.other_load() > 0.25 and time.monotonic() - started < self.args.wait_quiet:
            pass
        return time.monotonic() - started

    def _our_cpu(self) -> float:
        """CPU seconds of everything the benchmark started: long-running processes and finished clients."""
        total = children_cpu_seconds() + cpu_seconds(os.getpid())
        for proc in self.stack.procs.started:
            try:
                total += cpu_seconds(proc.pid)
            except (FileNotFoundError, ProcessLookupError):
                pass
        return total

    def _failed(self, record: dict[str, Any], front: Front, dead: list[Any]) -> None:
        failure = {key: record[key] for key in ("rep", "setup", "workload", "error")}
        failure["logs"] = {proc.name: proc.tail(40) for proc in ([front.proc] if front.proc else []) + front.elements}
        self.failures.append(failure)
        print(f"  ! {record['setup']} {record['workload']} rep {record['rep']}: {record['error'].splitlines()[0]}")
        for proc in dead:
            print(f"    {proc.name} exited with {proc.popen.returncode}; last lines:")
            print("      " + proc.tail(15).replace("\n", "\n      "))
        for i, element in enumerate(front.elements):
            if not element.alive():
                front.elements[i] = self.stack.procs.start(element.name + "-restart", element.argv)
        if front.proc is not None and not front.proc.alive():
            self.stack.restart_front(front)
        if record["target"] == "iperf":
            self.stack.start_iperf()  # a broken test can leave iperf3 -s busy

    # workloads ------------------------------------------------------------------
    def bulk(self, rep: int, setup: Setup, reverse: bool) -> None:
        if "iperf" not in setup.fronts:
            return  # a set-up for redis alone (the guard)
        name = "bulk_down" if reverse else "bulk_up"
        record = self.sample(rep, setup, name, "iperf", lambda port: iperf3(port, self.args.bulk_seconds, reverse))
        record["server_drain_s"] = self.iperf_idle()
        _show(record, "gbps", "Gb/s")

    def iperf_idle(self, timeout: float = 15.0) -> float:
        """Waits until iperf3 -s has closed its test's connections; returns how long that took.

        iperf3 -s serves one test at a time, and a proxy may still be flushing (or holding)
        a connection after the client has its result: the next set-up must not find it busy.
        """
        port = self.stack.server_ports["iperf"]
        started = time.monotonic()
        while open_connections(port) and time.monotonic() - started < timeout:
            time.sleep(0.02)
        waited = time.monotonic() - started
        if open_connections(port):
            print(f"  ! iperf3 -s still has a test open after {timeout:.0f} s: restarting it")
            self.stack.start_iperf()
        return waited

    @contextlib.contextmanager
    def placement(self, setup: Setup, workload: Redis) -> Iterator[int]:
        """For a one-CPU workload, pins redis-server, the set-up's redis front and its elements to one CPU
        (the client is pinned by taskset), and gives the CPUs back afterwards."""
        cpu = max(self.cpus)
        if not workload.one_cpu:
            yield cpu
            return
        front = setup.fronts["redis"]
        procs = [self.stack.servers["redis"], *([front.proc] if front.proc else []), *front.elements]
        try:
            for proc in procs:
                if proc.alive():
                    set_affinity(proc.pid, {cpu})
            yield cpu
        finally:
            for proc in procs:
                if proc.alive():
                    set_affinity(proc.pid, self.cpus)

    def redis(self, rep: int, setup: Setup, workload: Redis) -> None:
        requests = self.requests.get((setup.name, workload.name), 2000)
        timeout = 30 + 10 * self.args.redis_seconds
        with self.placement(setup, workload) as cpu:
            record = self.sample(rep, setup, workload.name, "redis",
                                 lambda port: redis_benchmark(workload, port, requests, timeout, cpu))
        _show(record, "rps", "req/s", "p50", "p99")
        if workload.name == "churn":
            time.sleep(1.2)  # TIME_WAIT sockets on loopback are reusable after 1 s: let the next set-up start clean

    def ab(self, rep: int, setup: Setup) -> None:
        requests = self.requests.get((setup.name, "ab50"), 2000)
        record = self.sample(rep, setup, "ab50", "http", lambda port: ab(port, requests, 30 + 10 * self.args.redis_seconds))
        _show(record, "rps", "req/s", "p50")
        time.sleep(1.2)  # its TIME_WAIT sockets, as after churn

    def calibrate_ab(self, name: str) -> None:
        """-n for `ab` so a run lasts about --redis-seconds (also a warm-up)."""
        front = self.stack.setups[name].fronts["http"]
        try:
            rps = ab(front.port, CALIBRATION_REQUESTS["ab50"], 60)["rps"]
        except WorkloadFailed as failed:
            print(f"  ! calibration {name} ab50: {str(failed).splitlines()[0]}")
            self.failures.append({"rep": 0, "setup": name, "workload": "ab50 (calibration)", "error": str(failed),
                                  "logs": {p.name: p.tail(40) for p in [front.proc, *front.elements] if p}})
            rps = CALIBRATION_REQUESTS["ab50"] / self.args.redis_seconds
        self.requests[name, "ab50"] = int(min(max(rps * self.args.redis_seconds, 500), 1_000_000))
        time.sleep(1.2)

    def calibrate(self) -> None:
        """Sizes -n per set-up and redis workload so each run lasts about --redis-seconds (also a warm-up)."""
        for name in self.setups:
            front = self.stack.setups[name].fronts["redis"]
            for workload in REDIS_WORKLOADS:
                requests = CALIBRATION_REQUESTS[workload.name]
                try:
                    with self.placement(self.stack.setups[name], workload) as cpu:
                        rps = redis_benchmark(workload, front.port, requests, 60, cpu)["rps"]
                except WorkloadFailed as failed:
                    print(f"  ! calibration {name} {workload.name}: {str(failed).splitlines()[0]}")
                    self.failures.append({"rep": 0, "setup": name, "workload": workload.name + " (calibration)",
                                          "error": str(failed),
                                          "logs": {p.name: p.tail(40) for p in [front.proc, *front.elements] if p}})
                    rps = requests / self.args.redis_seconds
                    if front.proc is not None and not front.proc.alive():
                        self.stack.restart_front(front)
                self.requests[name, workload.name] = int(min(max(rps * self.args.redis_seconds, 500), 5_000_000))
                if workload.name == "churn":
                    time.sleep(1.2)
            self.calibrate_ab(name)
            print(f"  {name:<9} " + "  ".join(f"{w} -n {self.requests[name, w]}"
                                              for w in [*(w.name for w in REDIS_WORKLOADS), "ab50"]))

    def peak_rss(self, rep: int) -> None:
        """VmHWM of each set-up's iperf3 front and its elements: the peak of bulk so far."""
        for name in self.setups:
            front = self.stack.setups[name].fronts.get("iperf")
            if front is None or front.proc is None or not front.proc.alive():
                continue
            elements = [proc.status()["VmHWM"] * 1024 / 1e6 for proc in front.elements if proc.alive()]
            figures = {"front_hwm_mb": front.proc.status()["VmHWM"] * 1024 / 1e6,
                       "front_rss_mb": front.proc.status()["VmRSS"] * 1024 / 1e6}
            if elements:
                figures["elements_hwm_max_mb"] = max(elements)
                figures["elements_hwm_mb"] = elements
            self.samples.append({"rep": rep, "setup": name, "workload": "rss_bulk", "target": "iperf",
                                 "time": time.time(), "figures": figures})

    def idle(self) -> None:
        """Idle connections through a fresh empty proxy and a fresh haproxy (targets: redis)."""
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        count = min(self.args.idle_connections, (soft - 256) // 2)
        if count < self.args.idle_connections:
            print(f"  RLIMIT_NOFILE is {soft}: a front holds 2 descriptors per connection, so {count} connections "
                  f"are held and the growth is scaled to {IDLE_CONNECTIONS:,}")
        for name in ("empty", "haproxy"):
            if name not in self.setups:
                continue
            front = (self.stack.start_proxy("empty", "redis", "-idle") if name == "empty"
                     else self.stack.start_haproxy("redis", "-idle"))
            assert front.proc is not None
            record: dict[str, Any] = {"rep": 1, "setup": name, "workload": "idle", "target": "redis",
                                      "time": time.time(), "figures": {}}
            try:
                record["figures"] = idle.measure(front.proc, front.port, self.stack.server_ports["redis"], count)
                print(f"  {name:<9} {count} idle connections: RSS {record['figures']['rss_before_mb']:.1f} -> "
                      f"{record['figures']['rss_after_mb']:.1f} MB, {record['figures']['growth_per_10k_mb']:.1f} MB "
                      f"per 10k")
            except (RuntimeError, OSError, subprocess.SubprocessError) as error:
                record["error"] = str(error)
                self.failures.append({"rep": 1, "setup": name, "workload": "idle", "error": str(error),
                                      "logs": {front.proc.name: front.proc.tail(40)}})
                print(f"  ! {name} idle: {str(error).splitlines()[0]}")
            finally:
                self.stack.procs.stop(front.proc)
            self.samples.append(record)

    # the schedule ------------------------------------------------------------------
    def run(self) -> None:
        print("calibrating redis-benchmark -n per set-up (and warming up)")
        self.calibrate()
        for rep in range(1, self.args.repeat + 1):
            shift = (rep - 1) % len(self.setups)
            order = [self.stack.setups[name] for name in self.setups[shift:] + self.setups[:shift]]
            print(f"repetition {rep}/{self.args.repeat}: {' '.join(s.name for s in order)}")
            for reverse in (False, True):
                for setup in order:
                    self.bulk(rep, setup, reverse)
            self.peak_rss(rep)
            for workload in REDIS_WORKLOADS:
                for setup in order:
                    self.redis(rep, setup, workload)
            for setup in order:
                self.ab(rep, setup)
        if self.args.idle_connections:
            print("idle connections")
            self.idle()


def _show(record: dict[str, Any], key: str, unit: str, *extra: str) -> None:
    head = f"  {record['setup']:<9} {record['workload']:<9}"
    if "error" in record:
        print(f"{head} FAILED")
        return
    figures = record["figures"]
    more = "".join(f"  {name} {figures[name]:.3f} ms" for name in extra if name in figures)
    value = figures.get(key, 0.0)
    if record.get("other_load_cpus", 0) > 0.2:
        more += f"  (other processes busy: {record['other_load_cpus']:.1f} CPU)"
    if "server_drain_s" in record and record["server_drain_s"] > 0.1:
        more += f"  (iperf3 -s busy {record['server_drain_s']:.1f} s after the client finished)"
    print(f"{head} {value:,.2f} {unit}{more}" if unit == "Gb/s" else f"{head} {value:,.0f} {unit}{more}")


def _raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit, inherited by every child (idle connections need it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1_048_576
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _check_tools() -> None:
    missing = [tool for tool in ("iperf3", "redis-server", "redis-benchmark", "redis-cli", "haproxy", "ab")
               if subprocess.run(["which", tool], capture_output=True).returncode != 0]
    if missing:
        sys.exit(f"bench: missing {', '.join(missing)}: apt-get install -y iperf3 redis-server redis-tools haproxy "
                 "apache2-utils")


def _meta(args: argparse.Namespace, setups: list[str], max_fds: int) -> dict[str, Any]:
    def out(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=REPO).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {
        "command": shlex.join(["python", "bench/run.py", *sys.argv[1:]]),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": out(["git", "rev-parse", "--short", "HEAD"]),
        "dirty": bool(out(["git", "status", "--porcelain", "proxy", "elements"])),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "haproxy": out(["haproxy", "-v"]).splitlines()[0] if out(["haproxy", "-v"]) else "",
        "iperf3": out(["iperf3", "--version"]).splitlines()[0] if out(["iperf3", "--version"]) else "",
        "redis": out(["redis-server", "--version"]),
        "rlimit_nofile": max_fds,
        "setups": {name: CHAINS.get(name, []) for name in setups},
        "repeat": args.repeat, "bulk_seconds": args.bulk_seconds, "redis_seconds": args.redis_seconds,
    }


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.bulk_seconds = args.bulk_seconds or (2 if args.quick else 3)
    args.redis_seconds = args.redis_seconds or (1.0 if args.quick else 2.5)
    setups = [name for name in args.setups.split(",") if name]
    unknown = set(setups) - set(KNOWN_SETUPS)
    if unknown:
        sys.exit(f"bench: unknown set-up(s) {', '.join(sorted(unknown))}; known: {', '.join(KNOWN_SETUPS)}")
    _check_tools()
    max_fds = _raise_fd_limit()
    signal.signal(signal.SIGTERM, _interrupt)
    work_dir = Path(tempfile.mkdtemp(prefix="ep-bench-"))
    procs = Procs(work_dir)
    stack = Stack(procs, work_dir, max_fds)
    bench = Bench(args, stack, setups)
    meta = _meta(args, setups, max_fds)
    started = time.monotonic()
    interrupted = None
    print(f"element-proxy bench: {meta['command']}  (commit {meta['commit']}{', dirty' if meta['dirty'] else ''}; "
          f"logs in {work_dir})")
    try:
        stack.start_servers()
        subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(stack.server_ports["redis"]),
                        "set", "key:__rand_int__", "xxx"], capture_output=True, timeout=10, check=True)
        print("starting set-ups: " + ", ".join(setups))
        stack.start_setups(setups)
        bench.run()
    except KeyboardInterrupt as stop:
        interrupted = str(stop) or "Ctrl-C"
        print(f"\nbench: interrupted ({interrupted}); stopping what it started")
    finally:
        procs.stop_all()
    meta["duration_s"] = round(time.monotonic() - started, 1)
    meta["interrupted"] = interrupted
    loads = [sample["other_load_cpus"] for sample in bench.samples if "other_load_cpus" in sample]
    if loads:
        meta["other_load_cpus"] = {"mean": sum(loads) / len(loads), "max": max(loads)}
    summary = report.summarize(bench.samples, setups)
    path = args.json or REPO / "bench" / "results" / f"{meta['started'].replace(':', '')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "requests": {f"{s}/{w}": n for (s, w), n in bench.requests.items()},
                                "summary": summary, "samples": bench.samples, "failures": bench.failures},
                               indent=1, default=str))
    print()
    print(f"{meta['command']}: {args.repeat} repetition(s), {meta['duration_s']:.0f} s, commit {meta['commit']}"
          f"{' (proxy/ or elements/ modified)' if meta['dirty'] else ''}, {meta['cpus']} CPUs; "
          f"medians (peak RSS: maximum){'; INTERRUPTED, partial' if interrupted else ''}")
    if loads:
        load = meta["other_load_cpus"]
        print(f"CPU used by processes the bench did not start, during the samples: "
              f"mean {load['mean']:.2f}, max {load['max']:.2f} of {meta['cpus']} CPUs")
    print()
    print(report.table(summary, setups))
    print()
    print(report.target_list(summary))
    if bench.failures:
        print(f"\n{len(bench.failures)} failed sample(s):")
        for failure in bench.failures:
            first = failure["error"].splitlines()[0]
            print(f"- {failure['setup']} {failure['workload']} rep {failure['rep']}: {first}")
            for name, tail in failure.get("logs", {}).items():
                if tail.strip():
                    print(f"  {name} log tail:\n    " + tail.replace("\n", "\n    "))
    print(f"\nraw samples: {path}")
    return 1 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
