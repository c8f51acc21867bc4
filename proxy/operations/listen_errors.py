"""Why the proxy could not listen, said so that the operator knows which setting and what to do.

A bare "[Errno 98] address already in use" names neither the listener nor the flag; the admin
endpoint's default (127.0.0.1:15000) is the usual culprit when two proxies share a host.
"""

from __future__ import annotations

import errno

_REASONS = {
    errno.EADDRINUSE: "address already in use (another process listens there: pick another port, or stop it)",
    errno.EADDRNOTAVAIL: "this host has no such address (use one of its addresses, 0.0.0.0 or [::])",
    errno.EACCES: "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
}


class CannotListen(Exception):
    """A listener or the admin endpoint could not bind; the message names the setting."""


def cannot_listen(what: str, address: object, setting: str, error: OSError, hint: str = "") -> CannotListen:
    reason = _REASONS.get(error.errno or 0, error.strerror or str(error))
    return CannotListen(f"cannot {what} on {address} ({setting}): {reason}{hint}")
