"""The README's first command: `element-proxy demo` shows each element at work and exits 0."""

from __future__ import annotations

import shutil
import subprocess

import pytest


def test_demo_shows_rewrite_firewall_and_pass() -> None:
    command = shutil.which("element-proxy")
    if command is None:
        pytest.skip("element-proxy is not installed (pip install -e .)")
    done = subprocess.run([command, "demo"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "sent 'hello world': reply 'target got: howdy world'" in done.stdout
    assert "sent 'SELECT 1; DROP TABLE users;': connection reset by the proxy" in done.stdout
    assert "sent 'just passing through': reply 'target got: just passing through'" in done.stdout
    assert "outcome=reset_by_element detail=element firewall reset it" in done.stderr
