"""Plot bench_kernels.py's JSON: one group of bars per case, one bar per provider, floors as lines.

    python benchmarks/plot_kernels.py [benchmarks/results/kernels_h200.json] [-o kernels_h200.png]

Needs matplotlib (not on the GPU host: run it where the JSON was copied to).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.transforms import blended_transform_factory  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from report_files import precision_label  # noqa: E402  (stdlib imports only at its top)

ORDER = ["deft", "flashinfer_decode", "flashinfer_decode_cc", "flashinfer_cascade", "sglang_triton", "torch_paged", "torch_cascade"]
LABEL = {
    "deft": "DeFT (ours)",
    "flashinfer_decode": "FlashInfer decode (tensor cores)",
    "flashinfer_decode_cc": "FlashInfer decode (CUDA cores)",
    "flashinfer_cascade": "FlashInfer multi-level cascade",
    "sglang_triton": "SGLang triton decode",
    "torch_paged": "torch paged (debug)",
    "torch_cascade": "torch cascade (debug)",
}
COLOR = {
    "deft": "#d62728",
    "flashinfer_decode": "#1f77b4",
    "flashinfer_decode_cc": "#17becf",
    "flashinfer_cascade": "#9467bd",
    "sglang_triton": "#2ca02c",
    "torch_paged": "#7f7f7f",
    "torch_cascade": "#bcbd22",
}


def _short(name: str) -> str:
    """Case labels wrap onto a few short lines under the bars."""
    name = name.replace(" (64 q / 8 kv heads)", "\n64q/8kv").replace("spec: ", "spec:\n")
    name = name.replace(" -> ", "→").replace("4-level: ", "4-level:\n").replace(" + ", " +\n")
    name = name.replace(" each", "").replace(" (4 levels: ", "\n(4 levels: ")
    name = name.replace("64-token draft tree", "64-token draft")
    return name.replace("no sharing, ", "no sharing\n").replace(", ", ",\n")


def plot(report: dict, out: Path) -> None:
    meta, rows = report["metadata"], report["cases"]
    providers = [p for p in ORDER if p in meta["providers"]]
    n = len(providers)
    width = 0.8 / max(n, 1)
    fig, ax = plt.subplots(figsize=(max(10, 1.5 * len(rows) + 3), 7))
    for i, p in enumerate(providers):
        for j, r in enumerate(rows):
            c = r["providers"].get(p, {})
            x = j - 0.4 + width * (i + 0.5)
            if c.get("median_us") is None:  # skipped / error: the markdown table says why
                if c.get("status"):
                    ax.text(x, 0.02, c["status"], rotation=90, ha="center", va="bottom", fontsize=7,
                            color=COLOR.get(p, "k"), transform=blended_transform_factory(ax.transData, ax.transAxes))
                continue
            ok = c.get("ok", False)
            ax.bar(x, c["median_us"], width, color=COLOR.get(p, "k"), alpha=1.0 if ok else 0.35,
                   hatch=None if ok else "xx", edgecolor="white" if ok else "black", linewidth=0.5)
            lo, hi = c.get("p20_us"), c.get("p80_us")
            if lo is not None and hi is not None:
                ax.plot([x, x], [lo, hi], color="black", linewidth=0.7)
    for j, r in enumerate(rows):
        if r.get("floor_us"):
            ax.hlines(r["floor_us"], j - 0.45, j + 0.45, colors="black", linestyles="-", linewidth=1.6)
        if r.get("flop_floor_us"):
            ax.hlines(r["flop_floor_us"], j - 0.45, j + 0.45, colors="gray", linestyles=":", linewidth=1.2)
        sp = r.get("speedup_vs_best")
        if sp and r.get("deft_us"):
            top = max([c.get("median_us") or 0 for c in r["providers"].values()] + [r.get("floor_us") or 0])
            ax.text(j, top * 1.25, f"{sp:.2f}x", ha="center", va="bottom", fontsize=9, fontweight="bold",
                    color=COLOR["deft"])
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([_short(r["case"]) for r in rows], fontsize=8)
    ax.set_ylabel("µs per decode-attention step (median, log scale)")
    ymax = max([c.get("median_us") or 0 for r in rows for c in r["providers"].values()] + [1.0])
    lows = [r.get(f) for r in rows for f in ("floor_us", "flop_floor_us")]
    lows += [c.get("median_us") for r in rows for c in r["providers"].values()]
    ymin = min([x for x in lows if x] or [1.0])
    ax.set_ylim(max(ymin / 2, 1e-3), ymax * 3)
    gm = report.get("geomean_speedup_design_shared")
    title = (f"Tree decode attention on {meta['gpu']} ({precision_label(meta)}, "
             f"{rows[0]['num_qo_heads'] if rows else '?'} q / {rows[0]['num_kv_heads'] if rows else '?'} kv heads "
             f"unless noted), {meta['date'][:10]}, {str(meta['commit'])[:12]}")
    sub = "red numbers: DeFT speedup over the best correct baseline"
    if gm:
        sub += f"; geomean over DESIGN.md's shared trees {gm:.2f}x"
    ax.set_title(title + "\n" + sub, fontsize=10)
    ax.grid(axis="y", which="both", alpha=0.25)
    handles = [Patch(color=COLOR.get(p, "k"), label=LABEL.get(p, p)) for p in providers]
    handles += [Line2D([], [], color="black", linewidth=1.6, label="floor: unique bytes / measured copy rate"),
                Line2D([], [], color="gray", linestyle=":", linewidth=1.2, label="FLOP floor"),
                Patch(facecolor="white", edgecolor="black", hatch="xx", label="output check failed")]
    ax.legend(handles=handles, fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="?", type=Path, default=HERE / "results" / "kernels_h200.json")
    ap.add_argument("-o", "--out", type=Path, default=None, help="PNG path (default: next to the JSON)")
    args = ap.parse_args(argv)
    report = json.loads(args.json.read_text())
    if not (isinstance(report, dict) and "metadata" in report and "cases" in report):  # (a summary, say)
        print(f"{args.json}: not a bench_kernels.py report (no metadata and cases)", file=sys.stderr)
        return 2
    out = args.out or args.json.with_suffix(".png")
    plot(report, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
