"""What the README's plots draw, read back from the matplotlib figure (not only that a PNG was written):
the kernel plot's bars are the cells' medians, a failed check is hatched, the floors are lines at
floor_us / flop_floor_us, the speedup label is the row's; the e2e plot's bars are tok/s relative to the
baseline, the target line is the case's, the legend says which backends ran CUDA graphs."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")
import matplotlib.figure  # noqa: E402

from repo_modules import REPO, load_module


def load(script):
    return load_module(script, REPO / "benchmarks" / f"{script}.py")


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot scripts save (captured instead of written)."""
    figs = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: figs.append(self))
    return figs


def bars(ax):
    return [(round(p.get_x() + p.get_width() / 2, 6), p.get_height(), p.get_hatch(), p.get_alpha())
            for p in ax.patches]


def hlines(ax):
    """(y, linestyle-is-solid) of every horizontal segment drawn with hlines."""
    out = []
    for coll in ax.collections:
        for seg in coll.get_segments():
            if len(seg) == 2 and seg[0][1] == seg[1][1]:
                out.append(float(seg[0][1]))
    return sorted(out)


def kernel_report():
    def cell(us, ok=True):
        return {"status": "ok" if ok else "failed_check", "ok": ok, "median_us": us, "p20_us": us - 1,
                "p80_us": us + 1}
    rows = [
        {"case": "prefix 4k, 16 x 256", "num_qo_heads": 32, "num_kv_heads": 8, "floor_us": 8.0,
         "flop_floor_us": 2.0, "speedup_vs_best": 3.0, "deft_us": 10.0,
         "providers": {"deft": cell(10.0), "flashinfer_decode": cell(30.0), "sglang_triton": cell(50.0, ok=False)}},
        {"case": "spec: prefix 2k + draft", "num_qo_heads": 32, "num_kv_heads": 8, "floor_us": 4.0,
         "flop_floor_us": 1.5, "speedup_vs_best": None, "deft_us": 20.0,
         "providers": {"deft": cell(20.0), "flashinfer_decode": {"status": "skipped", "reason": "x"},
                       "sglang_triton": cell(15.0, ok=False)}},
    ]
    meta = {"providers": ["deft", "sglang_triton", "flashinfer_decode"], "gpu": "H200", "dtype": "bfloat16",
            "date": "2026-12-01T00:00:00Z", "commit": "abc"}
    return {"metadata": meta, "cases": rows, "geomean_speedup_design_shared": None}


def test_kernel_plot_draws_the_json(tmp_path, drawn):
    plot = load("plot_kernels")
    path = tmp_path / "k.json"
    path.write_text(json.dumps(kernel_report()))
    assert plot.main([str(path)]) == 0
    (fig,) = drawn
    ax = fig.axes[0]
    drawn_bars = bars(ax)
    # ORDER: deft, flashinfer_decode, sglang_triton; width 0.8 / 3 per bar; skipped cells have no bar
    w = 0.8 / 3
    want = [(0 - 0.4 + w * 0.5, 10.0, None, 1.0), (1 - 0.4 + w * 0.5, 20.0, None, 1.0),
            (0 - 0.4 + w * 1.5, 30.0, None, 1.0),
            (0 - 0.4 + w * 2.5, 50.0, "xx", 0.35), (1 - 0.4 + w * 2.5, 15.0, "xx", 0.35)]
    assert [(round(x, 6), h, hatch, a) for x, h, hatch, a in want] == drawn_bars
    assert hlines(ax) == [1.5, 2.0, 4.0, 8.0]
    texts = [t.get_text() for t in ax.texts]
    assert "3.00x" in texts and "skipped" in texts and sum(t.endswith("x") and t[0].isdigit() for t in texts) == 1


def test_kernel_plot_title_names_an_fp8_cache_and_a_logit_cap(tmp_path, drawn):
    """An fp8 or capped run's plot was titled with the dtype alone, as if it were the plain bf16 run."""
    report = kernel_report()
    report["metadata"].update(kv_dtype="fp8_e4m3", logit_cap=50.0)
    path = tmp_path / "k.json"
    path.write_text(json.dumps(report))
    assert load("plot_kernels").main([str(path)]) == 0
    assert "(bfloat16, KV cache fp8_e4m3, logit cap 50, " in drawn[0].axes[0].get_title()


def test_kernel_plot_refuses_a_json_that_is_no_report(tmp_path, capsys):
    """benchmarks/results/kernels_h100_logit_cap.json, a summary, matches the plot's file names: a bare KeyError."""
    path = tmp_path / "kernels_summary.json"
    path.write_text(json.dumps({"gpu": "H100", "runs": []}))
    assert load("plot_kernels").main([str(path)]) == 2
    assert "not a bench_kernels.py report" in capsys.readouterr().err


def test_e2e_plot_draws_relative_tok_s_and_targets(tmp_path, drawn):
    plot = load("plot_e2e")
    report = {"backends": ["deft", "flashinfer", "triton"], "baseline": "flashinfer", "device_mode": "cuda",
              "gpu": "H200", "date": "2026-12-01", "commit": "abc",
              "cuda_graph": {"deft": False, "flashinfer": True, "triton": True},
              "cases": [{"case": "prefix 16000 x 64", "target": 2.5, "deft_tok_s": 7000.0, "flashinfer_tok_s": 2800.0,
                         "triton_tok_s": 1400.0,
                         "backends": {"deft": {"tok_s_source": "server_log_median"},
                                      "flashinfer": {"tok_s_source": "server_log_median", "client_tok_s": 2500.0},
                                      "triton": {"tok_s_source": "client", "client_tok_s": 1400.0}}},
                        {"case": "tree of thought", "target": None, "deft_tok_s": 900.0, "flashinfer_tok_s": 1000.0,
                         "triton_tok_s": None,
                         "backends": {"deft": {"tok_s_source": "client"}, "flashinfer": {"tok_s_source": "client"},
                                      "triton": {"ok": False}}}]}
    path = tmp_path / "e.json"
    path.write_text(json.dumps(report))
    assert plot.main([str(path)]) == 0
    fig = drawn[0]
    ax = fig.axes[0]
    # triton's client-side figure against flashinfer's client-side one (1400 / 2500), as the table's ratios,
    # not against its logged rate (0.5)
    assert [round(h, 6) for _, h, _, _ in bars(ax)] == [2.5, 1.0, 0.56, 0.9, 1.0]
    assert hlines(ax) == [2.5]  # the one case with a target
    labels = [t.get_text() for t in ax.texts]
    assert labels == ["7,000", "2,800", "1,400*", "900*", "1,000*"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[0] == "DeFT (ours) (CUDA graphs off)" and legend[1].endswith("(CUDA graphs on)")


def test_e2e_plot_of_a_run_without_the_baseline_is_relative_to_the_other_backend(tmp_path, drawn):
    """`--backends deft,triton` (e2e_h200_head_dim_256_triton.json): as the markdown table, relative to
    triton, and the baseline's targets are not drawn (before: an empty chart, 'relative to flashinfer')."""
    plot = load("plot_e2e")
    report = {"backends": ["deft", "triton"], "baseline": "flashinfer", "device_mode": "cuda", "gpu": "H200",
              "date": "2026-12-02", "commit": "abc", "cuda_graph": {"deft": True, "triton": True},
              "cases": [{"case": "prefix 4000 x 64", "target": 1.8, "deft_tok_s": 9000.0, "triton_tok_s": 3000.0,
                         "backends": {"deft": {"tok_s_source": "server_log_median"},
                                      "triton": {"tok_s_source": "server_log_median"}}}]}
    path = tmp_path / "e.json"
    path.write_text(json.dumps(report))
    assert plot.main([str(path)]) == 0
    ax = drawn[0].axes[0]
    assert [round(h, 6) for _, h, _, _ in bars(ax)] == [3.0, 1.0]
    assert hlines(ax) == [] and ax.get_ylabel() == "decode tok/s relative to triton"


def test_e2e_plot_labels_a_bar_with_the_figure_its_height_came_from(tmp_path, drawn):
    """deft with SGLang's logged rate against a baseline with only the client's: the bar is the client figures'
    ratio, and its label said deft's logged 7,000 (no *) over a bar of 6,000 / 2,000."""
    plot = load("plot_e2e")
    report = {"backends": ["deft", "flashinfer"], "baseline": "flashinfer", "device_mode": "cuda", "gpu": "H100",
              "date": "2026-12-05", "commit": "abc", "cuda_graph": {"deft": True, "flashinfer": True},
              "cases": [{"case": "prefix 4000 x 64", "target": None, "deft_tok_s": 7000.0, "flashinfer_tok_s": 2000.0,
                         "backends": {"deft": {"tok_s_source": "server_log_median", "client_tok_s": 6000.0},
                                      "flashinfer": {"tok_s_source": "client", "client_tok_s": 2000.0}}}]}
    path = tmp_path / "e.json"
    path.write_text(json.dumps(report))
    assert plot.main([str(path)]) == 0
    ax = drawn[0].axes[0]
    assert [round(h, 6) for _, h, _, _ in bars(ax)] == [3.0, 1.0]
    assert [t.get_text() for t in ax.texts] == ["6,000*", "2,000*"]
