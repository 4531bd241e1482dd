"""routing.<workload>.png: TTFT p90 and output tokens/s vs offered QPS, one line per arm."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.routing.arms import ALL_ARMS

COLORS = ("#7f7f7f", "#bcbd22", "#9467bd", "#8c564b", "#1f77b4", "#2ca02c", "#ff7f0e")  # by ALL_ARMS
EXTRA_COLORS = ("#d62728", "#17becf", "#e377c2", "#000000", "#ff9896", "#aec7e8", "#98df8a", "#c49c94")


def plot(rows: list[dict[str, Any]], out_dir: Path, stem: str = "routing") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for workload in dict.fromkeys(r["workload"] for r in rows):
        sub = [r for r in rows if r["workload"] == workload]
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
        extras = [a for a in dict.fromkeys(r["arm"] for r in sub) if a not in ALL_ARMS]
        for arm in dict.fromkeys(r["arm"] for r in sub):
            if arm in ALL_ARMS:
                color = COLORS[ALL_ARMS.index(arm)]
            else:
                color = EXTRA_COLORS[extras.index(arm) % len(EXTRA_COLORS)]
            pts = sorted((r["qps"], r["ttft_p90_s"], r["output_tok_s"]) for r in sub if r["arm"] == arm)
            style: dict[str, Any] = {"linewidth": 2.5 if arm.startswith("epp-tuned") or arm == "epp" else 1.3}
            style.update(color=color, linestyle="-" if arm in ALL_ARMS else "--")
            left.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=arm, **style)
            right.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=arm, **style)
        left.set_yscale("log")
        left.set_xlabel("offered QPS (requests/s)")
        left.set_ylabel("TTFT p90 (s, log scale)")
        left.set_title("TTFT p90 vs QPS (lower is better)")
        right.set_xlabel("offered QPS (requests/s)")
        right.set_ylabel("output tokens/s")
        right.set_title("Throughput vs QPS (higher is better)")
        for ax in (left, right):
            ax.grid(alpha=0.3)
        right.legend(fontsize=8)
        fig.suptitle(f"{workload}: simulated vLLM fleet (4 replicas) through each router")
        fig.tight_layout()
        path = out_dir / f"{stem}.{workload}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
