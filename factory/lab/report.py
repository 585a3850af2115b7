"""What every benchmark shares: its JSON report, its own section of docs/benchmarks.md, and plots.

Each benchmark prints JSON, writes it to --json, replaces its own section of the page and draws a
PNG next to it. Every figure comes from one run on the same fresh problems.
"""

from __future__ import annotations

from pathlib import Path

from factory.core.template import ReasoningTemplate
from factory.models.adapter import ModelAdapter
from factory.train.evaluate import emit  # noqa: F401  (the product's JSON report: every bench prints the same way)

DOCS_HELP = (
    "write this benchmark's section (and plot) into this page (the project passes docs/benchmarks.md); without it only --json is written"
)


def write_section(name: str, markdown: str, path: Path) -> None:
    """Replace this benchmark's section of the benchmarks page, leaving the others."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nEvery table below is written by the command in its section.\n"
    block = f"{start}\n{markdown.strip()}\n{end}"
    if start in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def auroc(positives: list[float], negatives: list[float]) -> float | None:
    """Probability that a random positive outscores a random negative (ties count half)."""
    if not positives or not negatives:
        return None
    ranked = sorted([(s, 1) for s in positives] + [(s, 0) for s in negatives])
    rank_sum, i = 0.0, 0
    while i < len(ranked):
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        average_rank = (i + j + 1) / 2  # 1-based ranks i+1..j
        rank_sum += average_rank * sum(label for _, label in ranked[i:j])
        i = j
    n_pos, n_neg = len(positives), len(negatives)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def scatter_plot(path: Path, points: dict[str, tuple[float, float]], xlabel: str, ylabel: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    colors, markers = plt.get_cmap("tab20").colors, "os^Dv<>P"
    # A legend, not labels at the points: settings with equal figures would print over each other.
    for i, (name, (x, y)) in enumerate(points.items()):
        ax.scatter(x, y, color=colors[i % len(colors)], marker=markers[i % len(markers)], s=40, label=name)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load(model: str, dtype: str | None = None) -> tuple[ModelAdapter, ReasoningTemplate]:
    adapter = ModelAdapter.load(model, dtype=dtype)
    return adapter, ReasoningTemplate(adapter.tokenizer)
