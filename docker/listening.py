"""Healthcheck: exit 0 when TCP sockets listen on every given port in this network namespace.

    python /demo/listening.py 15002 15006

Reads /proc/net/tcp and /proc/net/tcp6 instead of connecting: a direct connection to the
proxy's port would be a connection with no original destination, logged and closed.
"""

import sys

LISTEN = "0A"


def listening_ports() -> set[int]:
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as rows:
                next(rows)
                for row in rows:
                    fields = row.split()
                    if fields[3] == LISTEN:
                        ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        except FileNotFoundError:
            pass
    return ports


if __name__ == "__main__":
    missing = {int(port) for port in sys.argv[1:]} - listening_ports()
    if missing:
        print(f"not listening yet: {sorted(missing)}")
    sys.exit(1 if missing else 0)
