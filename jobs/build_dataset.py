"""Ray job entry point for `factory build`. From a checkout, against any Ray cluster:

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/build_dataset.py --spec my-spec.yaml

Inside a job Ray sets RAY_ADDRESS, so the build joins the cluster it was submitted to. Every other
option (--output, --limit, --dry-run, --address) is `factory build`'s.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from factory.pipeline import cli_build  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
    ap.add_argument("--spec", help="build spec YAML (default: the shipped default spec)")
    args, rest = ap.parse_known_args(argv)
    cli_build(([args.spec] if args.spec else []) + rest)


if __name__ == "__main__":
    main()
