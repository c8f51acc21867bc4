"""Helpers the tests share for watching a running proxy: polling with a bound, and reading one
sample out of Prometheus text."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> float:
    """Polls until condition() is true; returns how long it took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{what}: not true after {timeout}s")
        time.sleep(0.01)
    return time.monotonic() - start


def metric(text: str, name: str, default: float | None = None, **labels: str) -> float:
    """The value of the sample `name` whose labels are exactly `labels`; `default` when there is
    none, or an AssertionError showing the text when no default is given."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        sample_name, _, label_text = sample.partition("{")
        found = dict(pair.split("=", 1) for pair in label_text.rstrip("}").split(",") if pair)
        if sample_name == name and {k: v.strip('"') for k, v in found.items()} == labels:
            return float(value)
    if default is not None:
        return default
    raise AssertionError(f"{name}{labels} not in /metrics:\n{text}")
