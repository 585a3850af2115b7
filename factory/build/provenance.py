"""What produced a row, as a digest: a version string stays the same across edits. A build directory
records the code version and refuses to resume under other code, so one dataset never mixes traces
from two versions of the sampler or the filters. Only the rooms that make rows are digested: editing a
benchmark, the fine-tune loop or the publisher leaves every existing build resumable."""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

import factory

ROOT = Path(__file__).resolve().parents[2]
# The packages whose code decides a row's content; factory/lab, factory/train and factory/publish do not.
SOURCE_PACKAGES = ("factory/schemas", "factory/core", "factory/models", "factory/synthetic", "factory/build")


@cache
def code_version() -> str:
    """The package version and a digest of every Python source of the packages that build rows."""
    digest = hashlib.sha256()
    for path in sorted(p for package in SOURCE_PACKAGES for p in (ROOT / package).rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return f"{factory.__version__}+{digest.hexdigest()[:10]}"
