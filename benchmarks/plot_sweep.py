"""Plot tokens/s against batch size from a bench.py --sweep JSON.

    python benchmarks/plot_sweep.py benchmarks/results/sweep.json docs/images/throughput_vs_batch.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
    data = json.load(open(src))
    info, rows = data["info"], [r for r in data["results"] if r["workload"].startswith("sweep")]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for who in dict.fromkeys(r["who"] for r in rows):
        pts = sorted((r["samples"] * 4, r["tokens"] / r["warm_s"]) for r in rows if r["who"] == who)
        ax.plot(*zip(*pts), marker="o", label=who)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("branches per batch (samples x 4 branches, 64 prompt tokens each, 128 new)")
    ax.set_ylabel("generated tokens/s (warm)")
    ax.set_title(f"Qwen2.5-0.5B shape, bf16, {info['card']}, {info['date']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(dst)


if __name__ == "__main__":
    main(*sys.argv[1:3])
