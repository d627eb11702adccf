"""The quality-vs-TTFT frontier of policy/compile pairs, from saved `bench accuracy|qa|needle` runs.

Each results folder holds one compile mode (its settings say which) and any number of
policies; every (compile, policy) pair becomes one point, scored on the same records
(those all folders share, optionally leaving out the first --skip in the order of a
--questions/--data file: the dev split). Quality is agreement with full recompute and the
share of reuse's first-token KL removed, reuse meaning plain reuse of chunks compiled alone
when a folder of alone-compiled chunks is among the inputs. A point is on the frontier when
no other point is at least as cheap and strictly better on KL, the cost being the TTFT
relative to an anchor method of the same folder (--anchor), so folders timed on a busier
machine compare fairly. Prints a table, writes it with JSON and a PNG.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from .accuracy import answer_scores
from .records import read_jsonl

ANCHOR = "attnlink:16"  # default --anchor: TTFTs are also given relative to it in the same folder
METRICS = ("agree_vs_full", "contains", "f1", "kl_vs_full", "kl_tf_vs_full", "recomputed_fraction")


def load_points(
    folders: list[Path], order: list[str] | None, skip: int, anchor: str = ANCHOR
) -> tuple[list[dict], list[str]]:
    """One point per (compile mode, method) over the record ids every folder holds; the ids used."""
    runs = []
    for folder in folders:
        settings = json.loads((folder / "settings.json").read_text())
        records = {r["id"]: r for r in (json.loads(p.read_text()) for p in sorted((folder / "records").glob("*.json")))}
        for record in records.values():  # scores added since a record was saved come from its saved answer
            for method, row in record["methods"].items():
                if "answer" in row:
                    record["methods"][method] = {**answer_scores(row["answer"], record["answers"]), **row}
        older = "neighbour" if "compiled after the neighbour" in settings.get("chunking", "") else "alone"
        runs.append((settings.get("compile", older), records))
    shared = set.intersection(*(set(records) for _, records in runs))
    ids = [i for i in order if i in shared] if order is not None else sorted(shared)
    ids = ids[skip:]
    if not ids:
        raise ValueError("the folders share no records after --skip; check --skip and the folders")
    baseline = next((records for compile, records in runs if compile == "alone"), None)
    points = []
    for compile, records in runs:
        reuse_from = baseline if baseline is not None else records
        reuse_kl = _mean_of(reuse_from, ids, "reuse", "kl_vs_full")
        methods = set.intersection(*(set(records[i]["methods"]) for i in ids))
        present = [a for a in anchor.split(",") if a in methods]  # the first one a folder holds
        anchor_s = _median_of(records, ids, present[0]) if present else None
        for method in sorted(methods):
            rows = [records[i]["methods"][method] for i in ids]
            point = {"compile": compile, "method": method, "records": len(rows)}
            point.update({k: statistics.fmean(r[k] for r in rows) for k in METRICS if all(k in r for r in rows)})
            point["ttft_s"] = statistics.median(r["ttft_s"] for r in rows)
            point["ttft_vs_anchor"] = point["ttft_s"] / anchor_s if anchor_s else None
            if reuse_kl:
                point["kl_removed"] = (reuse_kl - point["kl_vs_full"]) / reuse_kl
            points.append(point)
    return mark_frontier(points), ids


def _median_of(records: dict, ids: list[str], method: str) -> float:
    return statistics.median(records[i]["methods"][method]["ttft_s"] for i in ids)


def _mean_of(records: dict, ids: list[str], method: str, key: str) -> float | None:
    rows = [records[i]["methods"].get(method) for i in ids]
    return statistics.fmean(r[key] for r in rows) if all(r is not None for r in rows) else None


def mark_frontier(points: list[dict]) -> list[dict]:
    """Sorted by cost, each with `frontier`: no other point costs as little or less with lower KL.
    The cost is the TTFT relative to the anchor of its own run when every run has one (so runs on
    a busier machine compare fairly), else the TTFT itself."""
    relative = all(p["ttft_vs_anchor"] is not None for p in points)
    cost = {id(p): p["ttft_vs_anchor"] if relative else p["ttft_s"] for p in points}
    points = sorted(points, key=lambda p: (cost[id(p)], p["kl_vs_full"]))
    for p in points:
        p["frontier"] = not any(
            q is not p and cost[id(q)] <= cost[id(p)] and q["kl_vs_full"] < p["kl_vs_full"] for q in points
        )
    return points


def format_table(points: list[dict], anchor: str = ANCHOR) -> str:
    head = (
        f"| compile | method | TTFT s (median) | x {anchor} | recomputed | agree with full | correct | F1 | "
        "KL first token | KL teacher-forced | reuse's KL removed | frontier |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|\n"
    )
    rows = [
        f"| {p['compile']} | {p['method']} | {p['ttft_s']:.3f} | {_ratio(p['ttft_vs_anchor'])} | "
        f"{p.get('recomputed_fraction', 0) * 100:.1f}% | "
        f"{p['agree_vs_full'] * 100:.0f}% | {p.get('contains', float('nan')) * 100:.1f} | "
        f"{p.get('f1', float('nan')) * 100:.1f} | {p['kl_vs_full']:.3f} | {p.get('kl_tf_vs_full', float('nan')):.3f} | "
        f"{_percent(p.get('kl_removed'))} | {'*' if p['frontier'] else ''} |"
        for p in points
    ]
    return head + "\n".join(rows) + "\n"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.0f}%"


def plot_frontier(points: list[dict], path: Path, title: str) -> Path:
    """KL of the first token (log) against median TTFT, one point per pair, the frontier joined."""
    from .plots import plt

    fig, ax = plt.subplots(figsize=(7, 4.6))
    modes = sorted({p["compile"] for p in points})
    for p in points:
        colour = f"C{modes.index(p['compile'])}"
        ax.scatter(p["ttft_s"], max(p["kl_vs_full"], 1e-4), color=colour, zorder=3)
        ax.annotate(p["method"], (p["ttft_s"], max(p["kl_vs_full"], 1e-4)), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")  # fmt: skip
    front = [p for p in points if p["frontier"]]
    ax.plot([p["ttft_s"] for p in front], [max(p["kl_vs_full"], 1e-4) for p in front], color="k", alpha=0.4)
    for i, compile in enumerate(modes):
        ax.scatter([], [], color=f"C{i}", label=f"compile {compile}")
    ax.set(xscale="log", yscale="log", xlabel="TTFT, median (s)", ylabel="first-token KL vs full (log)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def record_order(path: Path) -> list[str]:
    """Record ids in file order, as the harnesses name them (`id`, `_id`, else the line number)."""
    return [str(row.get("id", row.get("_id", i))) for i, row in enumerate(read_jsonl(path))]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folders", type=Path, nargs="+", help="results folders of bench accuracy, qa or needle")
    parser.add_argument(
        "--order", type=Path, default=None, help="the questions/data jsonl, to order records as asked (with --skip)"
    )
    parser.add_argument("--skip", type=int, default=0, help="leave out the first N records (the dev split)")
    parser.add_argument(
        "--anchor",
        default=ANCHOR,
        help=f"method whose median TTFT in each folder is the unit of cost (default {ANCHOR}); a comma list takes "
        "the first a folder holds: name a row timed in the same run as the others when a folder's methods were "
        "run at different times",
    )
    parser.add_argument("--title", default="", help="plot title")
    parser.add_argument("--out", type=Path, default=Path("bench-frontier"), help="folder for frontier.json/.png")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    order = record_order(args.order) if args.order is not None else None
    points, ids = load_points(args.folders, order, args.skip, args.anchor)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"records": ids, "anchor": args.anchor, "points": points}
    (args.out / "frontier.json").write_text(json.dumps(payload, indent=2))
    (args.out / "frontier.md").write_text(f"{len(ids)} records\n\n" + format_table(points, args.anchor))
    plot_frontier(points, args.out / "frontier.png", args.title or f"{len(ids)} records")
    print(f"{len(ids)} records\n")
    print(format_table(points, args.anchor))
    print(f"wrote {args.out / 'frontier.json'}, {args.out / 'frontier.png'}")
    return 0
