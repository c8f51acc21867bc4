"""gRPC's C core reads GRPC_EXPERIMENTS once, when grpc is imported: the proxy and every element
must have set their default before that, and the names must be ones this grpcio knows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import elements

ROOT = Path(__file__).resolve().parent.parent

# Records GRPC_EXPERIMENTS at the moment `grpc` is first imported, then imports the entry point.
WATCH_GRPC_IMPORT = """
import os, sys
seen = []
class WatchGrpc:
    def find_spec(self, name, path=None, target=None):
        if name == "grpc" and not seen:
            seen.append(os.environ.get("GRPC_EXPERIMENTS", "<unset>"))
        return None
sys.meta_path.insert(0, WatchGrpc())
import {module}
import grpc, grpc.aio, asyncio
asyncio.run(grpc.aio.insecure_channel("127.0.0.1:9").close())
print(seen[0] if seen else "<grpc not imported>")
"""


def _first_grpc_import(module: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", WATCH_GRPC_IMPORT.format(module=module)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def _environment_without_experiments() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key != "GRPC_EXPERIMENTS"}


@pytest.mark.parametrize("module", ["proxy.cli", "proxy.sessions.session", "elements.sdk", "elements.passthrough"])
def test_the_default_is_set_before_grpc_loads_and_grpc_knows_every_name(module: str) -> None:
    result = _first_grpc_import(module, _environment_without_experiments())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == elements.GRPC_EXPERIMENTS
    assert "experiment" not in result.stderr.lower(), result.stderr


@pytest.mark.parametrize("value", ["", "-event_engine_client"])
def test_a_value_the_user_set_wins(value: str) -> None:
    result = _first_grpc_import("proxy.cli", {**_environment_without_experiments(), "GRPC_EXPERIMENTS": value})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == value
