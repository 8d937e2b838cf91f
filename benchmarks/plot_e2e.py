"""Plot bench_e2e.py's JSON: per case, each backend's decode tok/s relative to the baseline (flashinfer on
the GPU; in a run without it, the first other backend), the absolute tok/s on the bars and the issue's
target for deft as a dashed line.

    python benchmarks/plot_e2e.py [benchmarks/results/e2e_h200.json] [-o e2e_h200.png]

Needs matplotlib (exits 2 with a message where it is missing).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_e2e import compared_tok_s, graphs_label, tok_s_ratio  # noqa: E402  (stdlib imports only at its top)
COLOR = {"deft": "#d62728", "flashinfer": "#1f77b4", "triton": "#2ca02c", "torch_native": "#7f7f7f"}
LABEL = {"deft": "DeFT (ours)", "flashinfer": "SGLang flashinfer decode", "triton": "SGLang triton decode",
         "torch_native": "SGLang torch_native decode"}


def _wrap(label: str) -> str:
    """Case labels broken onto short lines under the groups."""
    return label.replace(", ", ",\n").replace(" (sglang.lang)", "\n(sglang.lang)").replace(" x 32 tokens", "\nx 32 tokens")


def plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends, baseline, cases = report["backends"], report["baseline"], report["cases"]
    # As bench_e2e.markdown: a run without the baseline (`--backends deft,triton`) is drawn relative to the
    # first other backend, without the baseline's targets.
    compared = baseline if baseline in backends else next((b for b in backends if b != "deft"), baseline)
    width = 0.8 / len(backends)
    fig, ax = plt.subplots(figsize=(max(8, 2.2 * len(cases) + 2), 6))
    for j, case in enumerate(cases):
        for i, backend in enumerate(backends):
            # by one measure, as the table's ratio: both client-side where one side has only the client's; the
            # number on the bar is the figure its height was computed from
            ratio = tok_s_ratio(case, backend, compared)
            if ratio is None:  # missing: the markdown table says why
                continue
            tok_s, _, client = compared_tok_s(case, backend, compared)
            x = j - 0.4 + width * (i + 0.5)
            ax.bar(x, ratio, width, color=COLOR.get(backend, "#bcbd22"))
            ax.text(x, ratio, f"{tok_s:,.0f}{'*' if client else ''}", ha="center", va="bottom", fontsize=7,
                    rotation=90)
        if case.get("target") and compared == baseline:
            ax.hlines(case["target"], j - 0.45, j + 0.45, colors=COLOR["deft"], linestyles="dashed", linewidth=1)
    ax.axhline(1.0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(cases)), [_wrap(c["case"]) for c in cases], fontsize=8)
    ax.set_ylabel(f"decode tok/s relative to {compared}")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.15)  # room for the rotated tok/s labels
    cuda_graph = report.get("cuda_graph", {})
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLOR.get(b, "#bcbd22")) for b in backends]
    labels = [f"{LABEL.get(b, b)} (CUDA graphs {graphs_label(cuda_graph.get(b))})" for b in backends]
    handles.append(plt.Line2D([0], [0], color=COLOR["deft"], linestyle="dashed"))
    labels.append("target for deft")
    ax.legend(handles, labels, fontsize=8, loc="upper right")
    ax.set_title(f"End-to-end decode throughput, {report.get('gpu') or report['device_mode']}, "
                 f"{report['date'][:10]}, commit {report.get('commit')}\n"
                 "numbers on bars: tok/s (SGLang's logged rate; * client-side); tiny-model case: overhead only",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=130)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="?", type=Path, default=HERE / "results" / "e2e_h200.json")
    p.add_argument("-o", "--out", type=Path, default=None, help="default: the JSON's name with .png")
    args = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plot_e2e: matplotlib is not installed; no plot", file=sys.stderr)
        return 2
    out = args.out or args.json.with_suffix(".png")
    plot(json.loads(args.json.read_text()), out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
