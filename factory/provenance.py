"""What produced a row, as digests: a version string stays the same across edits, and the shipped
model has no Hub revision. A build directory records the code version and refuses to resume under
other code, so one dataset never mixes traces from two versions of the sampler or the filters."""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

import factory

ROOT = Path(__file__).resolve().parents[1]
SOURCE_PACKAGES = ("factory", "schemas")


@cache
def code_version() -> str:
    """The package version and a digest of every Python source of the packages that build rows."""
    digest = hashlib.sha256()
    for path in sorted(p for package in SOURCE_PACKAGES for p in (ROOT / package).rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return f"{factory.__version__}+{digest.hexdigest()[:10]}"


@cache
def weights_digest(directory: Path) -> str:
    """sha256 of a local checkpoint's weight files: the revision of a model that has none."""
    digest = hashlib.sha256()
    for path in sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.bin")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return f"sha256:{digest.hexdigest()[:12]}"
