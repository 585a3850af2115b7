"""Ray job entry point for `factory build`. From a checkout, against any Ray cluster:

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/build_dataset.py --spec my-spec.yaml --output /data/builds/my-build

Inside a job Ray sets RAY_ADDRESS, so the build joins the cluster it was submitted to. The driver's
working directory is Ray's temporary copy of the checkout, so the output directory must be an
absolute path on storage the head node keeps. Every other option (--limit, --dry-run, --address)
is `factory build`'s.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from factory.build.command import cli_build  # noqa: E402
from factory.build.spec import SpecError, load_spec  # noqa: E402
from factory.build.storage import is_uri  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
    ap.add_argument("--spec", help="build spec YAML (default: the shipped default spec)")
    ap.add_argument("--output", help="absolute output directory or a storage URI (default: the spec's output.dir)")
    args, rest = ap.parse_known_args(argv)
    try:
        output = args.output or load_spec(args.spec).output.dir
    except SpecError as err:
        sys.exit(str(err))
    if not is_uri(output) and not Path(output).is_absolute():
        sys.exit(
            f"jobs/build_dataset.py: output directory {output!r} is relative; under `ray job submit` it would land in Ray's "
            "temporary copy of the checkout. Pass an absolute --output on storage the head node keeps, or a URI (s3://, gs://, file://)."
        )
    cli_build(([args.spec] if args.spec else []) + ["--output", output] + rest)


if __name__ == "__main__":
    main()
