"""Importing `elements` (the proxy does it first) keeps big buffers on glibc's heap: a chunk's
buffers stop faulting their pages in afresh. Measured as page faults of a child process that
takes 64 KiB reads and joins them into 1 MiB batches, the way a session does."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tuning is glibc's")

# Prints whether the tuning applied and the page faults of 200 batches after a warm-up.
BATCHES = """
import resource
import elements
def batches():
    for _ in range(200):
        reads = [b"x" * 65536 for _ in range(16)]
        batch = b"".join(reads)
        del reads, batch
batches()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
batches()
print(elements.MALLOC_TUNED, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(**env: str) -> tuple[bool, int]:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
    result = subprocess.run([sys.executable, "-c", BATCHES], cwd=ROOT, env={**clean, **env},
                            capture_output=True, text=True, timeout=60, check=True)
    tuned, faults = result.stdout.split()
    return tuned == "True", int(faults)


def test_big_buffers_are_reused_not_faulted_in_again() -> None:
    tuned, faults = _faults()
    assert tuned
    assert faults < 50, f"{faults} page faults for 200 batches: buffers went back to the kernel"


def test_the_users_malloc_settings_win_and_show_what_the_tuning_saves() -> None:
    tuned, faults = _faults(MALLOC_MMAP_THRESHOLD_="131072")
    assert not tuned
    assert faults > 10_000, f"only {faults} page faults with glibc's own threshold: the test measures nothing"
