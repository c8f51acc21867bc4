# One image for the proxy, the iptables init step, the example elements and the demo
# app/client of docker-compose.yml (docs/compose.md).
#
#   docker build -t element-proxy .                                     # from PyPI
#   docker build --network host --build-arg BASE_IMAGE=local/debian:bookworm \
#       --build-arg OFFLINE=1 -t element-proxy .                        # no Python index
#
# BASE_IMAGE: any Debian-like image; iptables and iproute2 are installed with apt, and
# python3 with its venv module too when the base has no Python (e.g. a debootstrap
# minbase). OFFLINE=1 installs element-proxy and its dependencies only from the wheels
# in docker/wheels/ (`pip wheel -w docker/wheels .` on a host whose Python has the
# image's major.minor, 3.11 for Debian bookworm), with no index.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG OFFLINE=0
ENV PATH=/opt/element-proxy/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN set -eux; \
    need=""; \
    command -v iptables >/dev/null || need="$need iptables"; \
    command -v ip >/dev/null || need="$need iproute2"; \
    python3 -c 'import ensurepip, venv' 2>/dev/null || need="$need python3 python3-venv"; \
    if [ -n "$need" ]; then \
        apt-get update -qq; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 -m venv /opt/element-proxy; \
    useradd --uid 1337 --no-create-home --shell /usr/sbin/nologin element-proxy; \
    useradd --uid 1000 --no-create-home --shell /usr/sbin/nologin app

COPY docker/wheels/ /tmp/wheels/
COPY pyproject.toml README.md /src/
COPY proxy/ /src/proxy/
COPY elements/ /src/elements/
RUN set -eux; \
    if [ "$OFFLINE" = 1 ]; then \
        pip install -q --no-cache-dir --no-index --find-links /tmp/wheels element-proxy; \
    else \
        pip install -q --no-cache-dir --find-links /tmp/wheels /src; \
    fi; \
    rm -rf /tmp/wheels /src; \
    element-proxy --help >/dev/null; \
    python -c 'import elements.logger, elements.firewall, elements.rewrite, grpc, uvloop'

COPY docker/app.py docker/client.py docker/listening.py /demo/
CMD ["element-proxy", "--help"]
