"""One scheduled run: an incremental build, then a publish when the build changed, under a lock.

    python jobs/scheduled_build.py --spec spec.yaml --output /mnt/builds/my-build --repo-id ORG/NAME

The lock (beside the output directory) keeps two runs off one output: a second run exits at once
naming the holder, and the lock of a killed run is taken over. The build samples only the problems
the source gained since the last run; the publish is one Hub commit and a tag per build. Any failure
exits non-zero, so cron, Ray and KubeRay see it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from factory.build.command import build  # noqa: E402
from factory.build.lock import LockHeld, output_lock  # noqa: E402
from factory.build.output import BuildError, write_text  # noqa: E402
from factory.build.sources import SourceError  # noqa: E402
from factory.build.spec import SpecError, load_spec  # noqa: E402
from factory.publish.hub import PublishError, publish  # noqa: E402


def published_marker(out: Path) -> Path:
    return out / "_build" / "published.json"


def scheduled_run(
    spec_path: str | None, out: Path, repo_id: str, private: bool = False, revision: str | None = None, address=None, stale_after=None
) -> dict:
    """Build, then publish if the dataset's fingerprint is not the one last published to this repo."""
    spec = load_spec(spec_path).with_overrides(output_dir=out)
    with output_lock(out, stale_after=stale_after):
        manifest = build(spec, address, lock=False)  # this run holds the lock over the build and the publish
        marker = published_marker(out)
        last = json.loads(marker.read_text()) if marker.exists() else {}
        target = f"{repo_id}@{revision or 'main'}"  # what was last published where
        if last.get(target) == manifest["fingerprint"]:
            print(f"[scheduled] nothing new since the last publish of {manifest['fingerprint']} to {target}", flush=True)
            return {"published": False, "fingerprint": manifest["fingerprint"]}
        result = publish(out, repo_id, private=private, revision=revision)
        write_text(marker, json.dumps({**last, target: manifest["fingerprint"]}))
        return {"published": True, "fingerprint": manifest["fingerprint"], **result}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", help="build spec YAML (default: the default build)")
    ap.add_argument("--output", required=True, type=Path, help="the build directory, kept between runs (absolute on a cluster)")
    ap.add_argument("--repo-id", required=True, help="Hub dataset repo, ORG/NAME")
    ap.add_argument("--private", action="store_true")
    ap.add_argument("--revision", help="branch to publish to (default main)")
    ap.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    ap.add_argument("--stale-after", type=float, help="take over a lock from another host older than this (s): a run killed with its pod")
    args = ap.parse_args(argv)
    try:
        scheduled_run(args.spec, args.output, args.repo_id, args.private, args.revision, args.address, args.stale_after)
    except (LockHeld, SpecError, BuildError, SourceError, PublishError) as err:
        sys.exit(f"scheduled build: {err}")


if __name__ == "__main__":
    main()
