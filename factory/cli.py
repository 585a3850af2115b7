"""`factory build | eval | bench` — each subcommand's options live with the code it runs."""

from __future__ import annotations

import sys

USAGE = """usage: factory <command> [options]

commands:
  build [SPEC]        build a scored, filtered reasoning dataset (default spec: embedded model, synthetic source)
  eval                decode fresh synthetic problems and report answer accuracy
  bench samplers      every unmasking rule on the same problems: accuracy vs forward passes
  bench scoring       step scorers on clean and corrupted traces: AUROC vs passes
  bench pipeline      Ray pipeline traces/s against the in-process sampler
"""


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command == "build":
        from factory.pipeline import cli_build

        cli_build(rest)
    elif command == "eval":
        from factory.evaluate import cli_eval

        cli_eval(rest)
    elif command == "bench" and rest and rest[0] in ("samplers", "scoring", "pipeline"):
        if rest[0] == "pipeline":
            from factory.pipeline import cli_bench

            cli_bench(rest[1:])
        else:
            from factory import bench

            getattr(bench, f"cli_{rest[0]}")(rest[1:])
    else:
        sys.exit(f"factory: unknown command {' '.join(argv[:2])!r}\n\n{USAGE}")


if __name__ == "__main__":
    main()
