"""Write the routing benchmark's results: routing.json (header, targets, rows), routing.md and the plots.

    .venv/bin/python -m benchmarks.routing.report benchmarks/results/routing.runs.json   # re-render only

Modules: `aggregate.py` (runs -> rows, medians over repeats), `targets.py` (the targets), `crosscheck.py`
(k6 vs the Python client), `markdown.py` (routing.md), `plots.py` (the PNGs); this file ties them together.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.routing.aggregate import aggregate
from benchmarks.routing.markdown import markdown
from benchmarks.routing.plots import plot
from benchmarks.routing.targets import candidates, targets


def write(head: dict[str, Any], runs: list[dict[str, Any]], out: Path, plots: bool = True) -> None:
    rows = aggregate(runs)
    ours = candidates(rows)
    # Tuning (any epp-tuned* arm present): rivals are the baselines and peers, not other epp variants.
    tuning = any(a != "epp" for a in ours)
    variants = tuple(dict.fromkeys(r["arm"] for r in rows if r["arm"].startswith("epp")))
    goals = [g for arm in ours for g in targets(rows, arm, variants if tuning else ())]
    doc = {"header": head, "targets": goals, "rows": rows}
    out.write_text(json.dumps(doc, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(head, rows, goals, out.stem))
    if plots and rows:
        plot(rows, out.parent, out.stem)


def main(argv: list[str] | None = None) -> int:
    """Rewrite the .json / .md / plots from a .runs.json (e.g. after changing this report)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.routing.report", description=main.__doc__)
    parser.add_argument("runs", type=Path, help="a routing*.runs.json written by benchmarks.routing.run")
    args = parser.parse_args(argv)
    doc = json.loads(args.runs.read_text())
    out = args.runs.with_name(args.runs.name.removesuffix(".runs.json") + ".json")
    write(doc["header"], doc["runs"], out)
    print(f"wrote {out}, {out.with_suffix('.md')} and the plots beside them")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
