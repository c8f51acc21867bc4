"""A wheelhouse made offline from what this Python has installed, for a pip that must not reach
an index (tests/test_demo.py's quick start).

Each installed distribution lists its files in RECORD; zipped back with its dist-info and a
fresh RECORD they are the wheel it was installed from, close enough for pip (files outside
site-packages, such as console scripts, are left out: pip writes those anew from
entry_points.txt).
"""

from __future__ import annotations

import base64
import hashlib
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

SKIPPED = {"INSTALLER", "REQUESTED", "RECORD", "direct_url.json"}


def requirements_of(pyproject: Path) -> list[Requirement]:
    """The project's runtime and build requirements, as its pyproject.toml states them."""
    project = tomllib.loads(pyproject.read_text())
    return [Requirement(text) for text in [*project["project"]["dependencies"], *project["build-system"]["requires"]]]


def closure(roots: list[Requirement]) -> list[metadata.Distribution]:
    """The installed distributions that satisfy `roots` and what they require in turn."""
    environment = {key: str(value) for key, value in default_environment().items()} | {"extra": ""}
    found: dict[str, metadata.Distribution] = {}
    pending = list(roots)
    while pending:
        requirement = pending.pop()
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        name = canonicalize_name(requirement.name)
        if name in found:
            continue
        distribution = metadata.distribution(requirement.name)
        if distribution.version not in requirement.specifier:
            raise LookupError(f"{requirement} is wanted, {requirement.name} {distribution.version} is installed")
        found[name] = distribution
        pending += [Requirement(text) for text in distribution.requires or []]
    return list(found.values())


def repack(distribution: metadata.Distribution, into: Path) -> Path:
    """Writes `distribution` as a wheel into `into`; returns its path."""
    files = [path for path in distribution.files or []
             if not path.parts[0] == ".." and "__pycache__" not in path.parts
             and not (path.parent.name.endswith(".dist-info") and path.name in SKIPPED)]
    info = next(path.parent for path in files if path.parent.name.endswith(".dist-info"))
    tags = [line.split(":", 1)[1].strip() for line in (distribution.read_text("WHEEL") or "").splitlines()
            if line.startswith("Tag:")]
    name = canonicalize_name(distribution.metadata["Name"]).replace("-", "_")
    wheel = into / f"{name}-{distribution.version}-{tags[0] if tags else 'py3-none-any'}.whl"
    record = []
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as archive:
        for path in files:
            data = Path(str(distribution.locate_file(path))).read_bytes()
            archive.writestr(path.as_posix(), data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{path.as_posix()},sha256={digest},{len(data)}")
        record.append(f"{info.as_posix()}/RECORD,,")
        archive.writestr(f"{info.as_posix()}/RECORD", "\n".join(record) + "\n")
    return wheel


def build(pyproject: Path, into: Path) -> list[Path]:
    """Wheels of everything the project at `pyproject` needs to build and run."""
    into.mkdir(parents=True, exist_ok=True)
    return [repack(distribution, into) for distribution in closure(requirements_of(pyproject))]
