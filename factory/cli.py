"""`factory <command>`: the command table. Each subcommand's options live with the code it runs."""

from __future__ import annotations

import sys
from importlib import import_module

# (words, "module:function", help): the module is imported only when its command runs.
COMMANDS = [
    (("build",), "factory.build.command:cli_build", "build a scored, filtered reasoning dataset (no spec: the default build)"),
    (("finetune",), "factory.train.finetune:cli_finetune", "fine-tune a masked diffusion LM on builds' traces (accelerate)"),
    (("publish",), "factory.publish.hub:cli_publish", "publish a finished build to the Hugging Face Hub in one commit, tagged"),
    (("eval",), "factory.train.evaluate:cli_eval", "decode fresh synthetic problems and report answer accuracy"),
    (("bench", "samplers"), "factory.lab.samplers:cli_samplers", "every unmasking rule on the same problems: accuracy vs forward passes"),
    (("bench", "scoring"), "factory.lab.scoring:cli_scoring", "step scorers on clean and corrupted traces: AUROC vs passes"),
    (("bench", "precision"), "factory.lab.evaluate:cli_precision", "float32 vs bfloat16 weights: accuracy, speed, batch invariance"),
    (
        ("bench", "finetune"),
        "factory.lab.finetune:cli_bench_finetune",
        "SFT arms (gold, posterior, rejection, ...) from one base: held-out accuracy",
    ),
    (("bench", "padding"), "factory.lab.padding:cli_padding", "pad tokens per forward pass, arrival order vs grouped by question length"),
    (("bench", "pipeline"), "factory.lab.pipeline:cli_pipeline", "Ray pipeline traces/s against the in-process sampler"),
    (("bench", "yield"), "factory.lab.yields:cli_yield", "sampling strategies on the problems a model gets wrong: coverage per pass"),
    (("bench", "scale"), "factory.lab.scale:cli_scale", "builds of 1k/10k/100k problems: driver RSS, object store, rows/s"),
]


def usage() -> str:
    lines = [f"  {' '.join(words):<20}{text}" for words, _, text in COMMANDS]
    return "usage: factory <command> [options]\n\ncommands:\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    for words, target, _ in COMMANDS:
        if tuple(argv[: len(words)]) == words:
            module, function = target.split(":")
            getattr(import_module(module), function)(argv[len(words) :])
            return
    sys.exit(f"factory: unknown command {' '.join(argv[:2])!r}\n\n{usage()}")


if __name__ == "__main__":
    main()
