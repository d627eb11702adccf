"""PNG figures of the benchmarks (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from epic_rag.policies import AttnLink, parse_policy  # noqa: E402


def plot_f1_vs_ttft(summary: dict[str, dict], path: Path, title: str = "") -> Path:
    """The accuracy/speed trade-off: F1 (%) against median TTFT (log scale), one point per method
    (AttnLink-k points labelled k=.. and joined in order of k)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    links = {s: p.k for s, p in ((s, parse_policy(s)) for s in summary) if isinstance(p, AttnLink)}
    sweep = sorted(links, key=links.get)
    if len(sweep) > 1:  # the AttnLink-k sweep as one line, k growing along it
        ax.plot([summary[s]["ttft_s"] for s in sweep], [summary[s]["f1"] * 100 for s in sweep], color="C1", alpha=0.5)
    for i, (spec, m) in enumerate(summary.items()):
        colour = "C1" if spec in sweep else "C0" if spec == "full" else "C2"
        label = f"k={links[spec]}" if spec in sweep else spec
        ax.scatter(m["ttft_s"], m["f1"] * 100, color=colour, zorder=3)
        offset = (4, 4) if i % 2 == 0 else (4, -10)  # alternate sides so close points stay readable
        ax.annotate(label, (m["ttft_s"], m["f1"] * 100), textcoords="offset points", xytext=offset, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT, median (s, log scale)")
    ax.set_ylabel("F1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_scaling(rows: list[dict], path: Path, title: str = "") -> Path:
    """TTFT and peak memory against prompt tokens, one line per (method, KV source)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = sorted({(r["method"], r["kv_from"]) for r in rows})
    for method, source in series:
        cells = sorted((r for r in rows if r["method"] == method and r["kv_from"] == source), key=lambda r: r["tokens"])
        style = "-" if source == "memory" else "--"
        label = f"{method} ({source})"
        left.plot([c["tokens"] for c in cells], [c["ttft_s"] for c in cells], style, marker="o", label=label)
        right.plot([c["tokens"] for c in cells], [c["peak_rss_mib"] for c in cells], style, marker="o", label=label)
    left.set(xlabel="prompt tokens", ylabel="TTFT (s, log scale)", yscale="log", title="time to first token")
    right.set(xlabel="prompt tokens", ylabel="peak RSS (MiB)", title="peak memory of the process")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
    left.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
