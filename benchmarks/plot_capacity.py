"""Draw the committed capacity ramps: decision latency p50 and p95 against the number of streams, one colour
per mode (docs/performance.md and docs/scaling.md show the pictures).

    python -m benchmarks.plot_capacity [--results docs/results] [--out docs/figures]

Reads every ``*.json`` in ``--results`` that holds ``runs`` of ``benchmarks/capacity.py`` rows (mode,
streams, decision_p50_ms, decision_p95_ms, verdict, decisions [arrived, expected]) and writes one PNG of
the same name to ``--out``. Nothing is measured here: the figures are the committed numbers, drawn.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# One colour per mode, the same in every figure; p50 solid, p95 dashed.
MODE_COLOURS = {"direct": "#1f77b4", "websocket": "#2ca02c", "baseline": "#d62728", "direct-exact": "#9467bd"}


def load_rows(results: dict) -> dict[str, list[dict]]:
    """Rows per mode, by stream count, over all runs of one results file."""
    modes: dict[str, list[dict]] = {}
    for run in results["runs"]:
        for row in run["rows"]:
            modes.setdefault(row["mode"], []).append(row)
    return {mode: sorted(rows, key=lambda row: row["streams"]) for mode, rows in modes.items()}


def plot(results: dict, out_path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server or in CI
    import matplotlib.pyplot as plt

    modes = load_rows(results)
    figure, axes = plt.subplots(figsize=(8, 4.6), dpi=100)
    for mode, rows in modes.items():
        colour = MODE_COLOURS.get(mode)
        streams = [row["streams"] for row in rows]
        for percentile, style in (("50", "-"), ("95", "--")):
            axes.plot(streams, [row[f"decision_p{percentile}_ms"] for row in rows], style, color=colour,
                      marker="o", markersize=4, label=f"{mode} p{percentile}")
        # A failed N (targets missed, or decisions that never arrived) gets a hollow ring on its p95.
        # "PASS; not judged: ..." (a target with nothing to judge, capacity.py's Targets.verdict) is a pass.
        failed = [row for row in rows if not row["verdict"].startswith("PASS")]
        axes.plot([row["streams"] for row in failed], [row["decision_p95_ms"] for row in failed], "o",
                  markersize=10, markerfacecolor="none", color=colour)
        for row in rows:
            arrived, expected = row["decisions"]
            if arrived < expected:
                axes.annotate(f"{arrived}/{expected} decisions", (row["streams"], row["decision_p95_ms"]),
                              textcoords="offset points", xytext=(-10, 6), ha="right", va="bottom", fontsize=8,
                              color=colour)
    target_ms = results["targets"]["decision_p95_ms"]
    axes.axhline(target_ms, color="grey", linewidth=0.8, linestyle=":")
    axes.annotate(f"p95 target {target_ms:g} ms", (1, target_ms), xycoords=("axes fraction", "data"),
                  textcoords="offset points", xytext=(-4, 3), ha="right", fontsize=8, color="grey")
    all_streams = sorted({row["streams"] for rows in modes.values() for row in rows})
    axes.set_xscale("log", base=2)
    axes.set_xticks(all_streams, [str(n) for n in all_streams])
    axes.minorticks_off()
    axes.set_yscale("log")
    latencies_ms = [row[f"decision_p{p}_ms"] for rows in modes.values() for row in rows for p in ("50", "95")]
    axes.set_ylim(min(latencies_ms) / 1.5, max(*latencies_ms, target_ms) * 4)  # room above for the legend
    axes.set_xlabel("real-time streams")
    axes.set_ylabel("decision latency, ms (log scale)")
    axes.set_title(results["title"], fontsize=10)
    axes.grid(True, which="major", linewidth=0.3)
    axes.legend(fontsize=8, ncol=len(modes), loc="upper left")
    dates = sorted({run["date"] for run in results["runs"]})
    note = f"{', '.join(dates)}; {results['machine']}. A hollow ring: that N missed the targets."
    figure.text(0.01, 0.01, "\n".join(textwrap.wrap(note, 150)), fontsize=6.5, color="dimgrey")
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_path)
    plt.close(figure)
    return out_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=REPO_ROOT / "docs" / "results")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "figures")
    args = parser.parse_args(argv)
    for path in sorted(args.results.glob("*.json")):
        results = json.loads(path.read_text(encoding="utf-8"))
        if "runs" in results:
            print(plot(results, args.out / f"{path.stem}.png"))


if __name__ == "__main__":
    main()
