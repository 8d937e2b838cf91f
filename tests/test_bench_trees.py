"""The kernel benchmark's cases and the index arrays it hands each baseline (CPU only, seconds).

Every case must be the tree its name says; FlashInfer's page lists, SGLang's kv_indptr/kv_indices and
the cascade's per-level arrays must make every query attend exactly its root-to-node path; and the
benchmark's correctness criterion must catch a dropped node while passing bf16 rounding.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from bench_modules import BENCH, T, random_qkv
from sglang_deft.kernels import attention_reference

CASES = {c.key: c for c in T.every_case()}
POOL = 1 << 18

# the head-dim cases' key suffixes and heads q/kv/dim
HEAD_DIMS = [("d64", (32, 8, 64)), ("d96", (32, 32, 96)), ("d256", (16, 16, 256)), ("d256_g2", (16, 8, 256))]
# key: (queries, nodes, unique KV tokens, path tokens of every query or None, heads q/kv/dim)
EXPECTED = {
    "p4k_16": (16, 17, 4096 + 16 * 256, 4096 + 256, (32, 8, 128)),
    "p4k_64": (64, 65, 4096 + 64 * 256, 4096 + 256, (32, 8, 128)),
    "p16k_64": (64, 65, 16384 + 64 * 256, 16384 + 256, (32, 8, 128)),
    "p1k_256": (256, 257, 1024 + 256 * 128, 1024 + 128, (32, 8, 128)),
    "tree3": (64, 1 + 4 + 64, 2048 + 4 * 1024 + 64 * 256, 2048 + 1024 + 256, (32, 8, 128)),
    "nosharing": (64, 64, 64 * 2048, 2048, (32, 8, 128)),
    "tree4": (64, 1 + 4 + 16 + 64, 1024 + 4 * 512 + 16 * 256 + 64 * 128, 1024 + 512 + 256 + 128, (32, 8, 128)),
    "p16k_64_h64": (64, 65, 16384 + 64 * 256, 16384 + 256, (64, 8, 128)),
    "p1k_256_h64": (256, 257, 1024 + 256 * 128, 1024 + 128, (64, 8, 128)),
    "spec": (64, 65, 2048 + 64, None, (32, 8, 128)),
    "b1_4k": (1, 1, 4096, 4096, (32, 8, 128)),
    "b1_32k": (1, 1, 32768, 32768, (32, 8, 128)),
    "b4_8k": (4, 4, 4 * 8192, 8192, (32, 8, 128)),
    "b8_8k": (8, 8, 8 * 8192, 8192, (32, 8, 128)),
    "b16_2k": (16, 16, 16 * 2048, 2048, (32, 8, 128)),
    "b16_8k": (16, 16, 16 * 8192, 8192, (32, 8, 128)),
    "n4_p2k": (4, 5, 2048 + 4 * 256, 2048 + 256, (32, 8, 128)),
    "n8_p8k": (8, 9, 8192 + 8 * 128, 8192 + 128, (32, 8, 128)),
    **{f"p4k_64_{tag}": (64, 65, 4096 + 64 * 256, 4096 + 256, heads)
       for tag, heads in HEAD_DIMS},
    **{f"nosharing_{tag}": (64, 64, 64 * 2048, 2048, heads)
       for tag, heads in HEAD_DIMS},
}


def test_every_case_is_listed():
    assert set(CASES) == set(EXPECTED)
    assert sum(c.design_shared for c in CASES.values()) == 5
    assert set(T.quick_cases()) <= set(CASES)


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def built(request):
    case = CASES[request.param]
    return case, T.build_tree(case.shape, POOL, seed=1)


def test_tree_valid_and_sized(built):
    case, tree = built
    tree.validate()
    nq, nn, unique, path_len, heads = EXPECTED[case.key]
    assert (tree.num_queries, tree.num_nodes) == (nq, nn)
    assert (case.num_qo_heads, case.num_kv_heads, case.head_dim) == heads
    assert case.shape.unique_tokens == unique
    assert tree.kv_indices.numel() == sum(case.shape.node_len) == unique  # every node is attended
    lens = [s.numel() for s in T.query_slots(tree)]
    if path_len is not None:
        assert lens == [path_len] * nq
    assert sum(lens) == case.shape.path_tokens
    model = T.byte_flop_model(case.shape, *heads)
    assert model["unique_bytes"] == unique * 2 * heads[1] * heads[2] * 2 + 2 * nq * heads[0] * heads[2] * 2
    assert model["flops"] == 4 * heads[0] * heads[2] * sum(lens)


def test_spec_tree_shape():
    shape = CASES["spec"].shape
    depth = shape.depth()
    assert shape.node_len[0] == 2048 and all(n == 1 for n in shape.node_len[1:])
    assert [sum(1 for d in depth if d == lvl) for lvl in range(1, 5)] == [8, 16, 20, 20]
    assert sorted(shape.query_node) == list(range(1, 65))  # every draft token is a query
    inner = set(shape.node_parent) - {-1}
    assert sum(1 for q in shape.query_node if q in inner) > 10  # queries end at inner nodes too
    assert {len(shape.path(q)) for q in shape.query_node} == {2, 3, 4, 5}


def test_slot_layout(built):
    case, tree = built
    kv = tree.kv_indices.long()
    assert kv.unique().numel() == kv.numel(), "two tokens share a KV slot"
    assert int(kv.min()) >= 0 and int(kv.max()) < POOL
    run = T.DEFAULT_RUN
    indptr = tree.node_indptr.tolist()
    for n in range(tree.num_nodes):
        seg = kv[indptr[n]:indptr[n + 1]]
        steps = seg[1:] - seg[:-1]
        inside = (torch.arange(1, seg.numel()) % run) != 0  # token i and i-1 in the same run
        assert bool((steps[inside] == 1).all()), "a run is not contiguous"
        assert int(seg[0]) % run == 0 if seg.numel() else True
    # Runs are scattered: a node longer than a run is not one contiguous range.
    long_nodes = [n for n in range(tree.num_nodes) if indptr[n + 1] - indptr[n] > 4 * run]
    if long_nodes:
        n = long_nodes[0]
        seg = kv[indptr[n]:indptr[n + 1]]
        assert int(seg[-1] - seg[0]) != seg.numel() - 1


def _truth(tree):
    """Each query's slots from the shape alone (independent of query_slots)."""
    parent = tree.node_parent.tolist()
    indptr = tree.node_indptr.tolist()
    out = []
    for node in tree.query_node.tolist():
        path = []
        while node != -1:
            path.append(node)
            node = parent[node]
        out.append([s for n in reversed(path) for s in tree.kv_indices[indptr[n]:indptr[n + 1]].tolist()])
    return out


def test_paged_arrays_expand_to_paths(built):
    """FlashInfer decode (page_size 1) and SGLang triton take the same kv_indptr / kv_indices."""
    _, tree = built
    indptr, idx = T.paged_arrays(tree)
    assert indptr.dtype == idx.dtype == torch.int32
    ip = indptr.tolist()
    assert [idx[ip[b]:ip[b + 1]].tolist() for b in range(tree.num_queries)] == _truth(tree)
    assert [s.tolist() for s in T.query_slots(tree)] == _truth(tree)


def test_cascade_arrays_expand_to_paths(built):
    case, tree = built
    lay = T.cascade_layout(tree)
    B = tree.num_queries
    assert sorted(lay.perm.tolist()) == list(range(B))
    depth = case.shape.depth()
    assert len(lay.levels) == 1 + max(depth[q] for q in case.shape.query_node)
    for lv in lay.levels:
        for t in (lv.qo_indptr, lv.kv_indptr, lv.kv_indices, lv.last_page_len):
            assert t.dtype == torch.int32
        qo, kvp = lv.qo_indptr.tolist(), lv.kv_indptr.tolist()
        assert qo[0] == 0 and qo[-1] == B and all(a < b for a, b in zip(qo, qo[1:]))
        assert len(kvp) == len(qo) and kvp[-1] == lv.kv_indices.numel()
        pages = [b - a for a, b in zip(kvp, kvp[1:])]
        # FlashInfer: kv_len = max(pages - 1, 0) * page_size + last_page_len
        assert lv.last_page_len.tolist() == [1 if p else 0 for p in pages]
    assert [s.tolist() for s in T.cascade_query_slots(lay)] == _truth(tree)
    if case.key == "spec":
        assert lay.empty_requests > 0 and lay.inner_queries > 0
        assert f"{lay.inner_queries} of the {B} end at inner nodes" in case.note  # the note the JSON records
    else:
        assert lay.empty_requests == 0 and lay.inner_queries == 0
    # Sharing is kept: at every level, one request per node (its queries contiguous), so each
    # node's KV is listed once; level 0 of a one-root tree is a single request for the whole batch.
    for lvl, lv in enumerate(lay.levels):
        nodes = {case.shape.path(q)[lvl] for q in case.shape.query_node if len(case.shape.path(q)) > lvl}
        assert lv.kv_indices.numel() == sum(case.shape.node_len[n] for n in nodes)
        non_empty = sum(1 for a, b in zip(lv.kv_indptr.tolist(), lv.kv_indptr.tolist()[1:]) if b > a)
        assert non_empty == len(nodes)
    if case.shape.node_parent.count(-1) == 1:
        assert lay.levels[0].qo_indptr.tolist() == [0, B]


SMALL_SHAPES = {
    "p4k_16_shrunk": lambda: BENCH.shrink_shape(CASES["p4k_16"].shape, 64),
    "three_levels": lambda: T.fork_tree([(1, 40), (3, 7), (2, 5)]),
    "four_levels": lambda: T.fork_tree([(1, 33), (2, 9), (2, 4), (2, 3)]),
    "no_sharing": lambda: T.no_sharing(4, 20),
    "spec": lambda: T.spec_tree(30, (3, 4, 5, 5), seed=1),
}


@pytest.mark.parametrize("name", sorted(SMALL_SHAPES))
def test_baseline_math_matches_reference(name):
    """Attention computed the way each baseline reads its arrays (incl. the cascade's permutation,
    log-sum-exp merge and empty-KV requests) equals the fp32 reference, on small trees."""
    shape = SMALL_SHAPES[name]()
    tree = T.build_tree(shape, 1 << 14, seed=2)
    q, k, v = random_qkv(tree.num_queries, 1 << 14, seed=0)
    ref = attention_reference(q, k, v, tree, 0.25)
    indptr, idx = T.paged_arrays(tree)
    torch.testing.assert_close(T.paged_attention_torch(q, k, v, indptr, idx, 0.25), ref, atol=1e-5, rtol=1e-5)
    got = T.cascade_attention_torch(q, k, v, T.cascade_layout(tree), 0.25)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_cascade_merge_is_stable_for_large_scores():
    """The cascade's log-sum-exp merge across levels with scores in the hundreds (exp would overflow
    without subtracting the running maximum)."""
    shape = T.fork_tree([(1, 40), (3, 7), (2, 5)])
    tree = T.build_tree(shape, 1 << 12, seed=5)
    q, k, v = random_qkv(tree.num_queries, 1 << 12, seed=1)
    ref = attention_reference(q, k, v, tree, 40.0)
    got = T.cascade_attention_torch(q, k, v, T.cascade_layout(tree), 40.0)
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_check_catches_a_dropped_leaf_but_passes_bf16_rounding():
    shape = T.fork_tree([(1, 4096), (4, 256)])
    tree = T.build_tree(shape, 1 << 14, seed=3)
    q, k, v = random_qkv(4, 1 << 14, seed=0, dim=64, dtype=torch.bfloat16)
    ref = attention_reference(q, k, v, tree, 0.125)
    assert BENCH.check(ref.bfloat16(), ref)["ok"]
    # Query 3 loses its 256-token leaf: a kernel that skipped a node.
    wrong = T.KVTree(tree.kv_indices, tree.node_indptr, tree.node_parent, torch.tensor([1, 2, 3, 0], dtype=torch.int32))
    bad = attention_reference(q, k, v, wrong, 0.125)
    res = BENCH.check(bad.bfloat16(), ref)
    assert not res["ok"] and res["max_rel_err"] > 10 * BENCH.MAX_REL_ERR
    nan = ref.clone()
    nan[0, 0, 0] = float("nan")
    assert not BENCH.check(nan, ref)["ok"]


def test_sglang_split_count_copy_matches_sglang_kernel(tmp_path):
    """The host copy of SGLang's get_num_kv_splits_triton against the real kernel source, run by
    Triton's CPU interpreter (the kernel is lifted out of triton_backend.py, which itself needs CUDA
    libraries to import)."""
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("sglang not installed")
    path = Path(spec.submodule_search_locations[0]) / "srt/layers/attention/triton_backend.py"
    inputs = []
    for c in CASES.values():
        lens = [s.numel() for s in T.query_slots(T.build_tree(c.shape, POOL))]
        inputs.append([lens, c.num_qo_heads, c.num_kv_heads, 8, 132])
    inputs.append([[100, 5000, 37, 2049], 32, 8, 8, 132])
    inputs.append([[300] * 7, 32, 32, 8, 78])
    inputs.append([[80, 100], 32, 8, 8, 1])  # max_len * 8 == min_len * 10: the boundary of the min_len rule
    # The interpreter re-reads a kernel's source from its file: give the lifted kernel a file.
    text = path.read_text()
    fn = next(n for n in ast.parse(text).body
              if isinstance(n, ast.FunctionDef) and n.name == "get_num_kv_splits_triton")
    kernel_file = tmp_path / "sglang_num_kv_splits_kernel.py"
    kernel_file.write_text("import triton\nimport triton.language as tl\n\n\n@triton.jit\n"
                           + ast.get_source_segment(text, fn) + "\n")
    script = textwrap.dedent(f"""
        import importlib.util, json, sys
        import torch, triton
        spec = importlib.util.spec_from_file_location("k", {str(kernel_file)!r})
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        res = []
        for lens, hq, hkv, maxs, cores in json.load(sys.stdin):
            out = torch.zeros(len(lens), dtype=torch.int32)
            sched = 256 if len(lens) < 256 else triton.next_power_of_2(len(lens))
            mod.get_num_kv_splits_triton[(1,)](out, torch.tensor(lens, dtype=torch.int32), len(lens), 1, hq,
                                               hkv, maxs, cores, MAX_NUM_SEQ=sched)
            res.append(out.tolist())
        print(json.dumps(res))
    """)
    proc = subprocess.run([sys.executable, "-c", script], input=json.dumps(inputs), capture_output=True,
                          text=True, env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    want = [T.sglang_num_kv_splits(*x) for x in inputs]
    assert got == want


def test_case_selection():
    assert [c.key for c in BENCH.select_cases("all")] == [c.key for c in T.all_cases()]
    low = [c.key for c in T.low_concurrency_cases()]
    assert [c.key for c in BENCH.select_cases("low_concurrency")] == low
    assert not set(low) & {c.key for c in T.all_cases()}
    assert [c.key for c in BENCH.select_cases("spec, p4k_16,b1_4k")] == ["p4k_16", "spec", "b1_4k"]
    assert [c.key for c in BENCH.select_cases("head_dims")] == [c.key for c in T.head_dim_cases()]
    design = {c.key for c in BENCH.select_cases("design")}
    assert len(design) == 6 and "nosharing" in design
    with pytest.raises(SystemExit, match="b1_5k"):
        BENCH.select_cases("p4k_16,b1_5k")
    # An empty selection (an unset variable in a script) wrote a "complete" report of no cases over the last one.
    for empty in ("", ",", " "):
        with pytest.raises(SystemExit, match="names no case"):
            BENCH.select_cases(empty)


@pytest.mark.parametrize("flag", ["--run-len", "--cpu-reps", "--plan-reps", "--shrink", "--rep", "--case-timeout"])
def test_counts_below_one_are_refused_by_the_kernel_benchmark(flag, capsys):
    """--cpu-reps 0 took a median of no timings (IndexError), --run-len 0 divided by zero, after the setup."""
    with pytest.raises(SystemExit) as exited:
        BENCH.parse_args([flag, "0"])
    assert exited.value.code == 2 and f"{flag} must be at least 1" in capsys.readouterr().err


def test_bench_script_runs_on_cpu(tmp_path):
    """The whole script's plumbing (cases, checks, JSON, table) with the plain-PyTorch providers."""
    rc = BENCH.main(["--device", "cpu", "--dtype", "float32", "--shrink", "64", "--isolate", "no",
                     "--providers", "torch_paged,torch_cascade", "--cases", "spec", "--cpu-reps", "1",
                     "--out", str(tmp_path), "--commit", "test"])
    assert rc == 0
    assert not (tmp_path / "kernels_h200.json").exists()  # a CPU run is tagged cpu: it never replaces the GPU's
    # a run of some cases is named for them: it never replaces a whole run's file
    assert not (tmp_path / "kernels_cpu.json").exists()
    report = json.loads((tmp_path / "kernels_cpu_float32_spec.json").read_text())
    assert report["metadata"]["complete"] and report["metadata"]["commit"] == "test"
    rows = {r["key"]: r for r in report["cases"]}
    assert set(rows) == {"spec"}
    for r in rows.values():
        for field in ("case", "deft_us", "best_baseline", "best_baseline_us", "floor_us", "flop_floor_us",
                      "torch_paged_us", "torch_cascade_us"):
            assert field in r
        assert r["floor_us"] > 0 and r["torch_paged_ok"] and r["torch_cascade_ok"]
        assert r["best_baseline"] is None  # debug providers are never a baseline
    assert "| spec: prefix 2k" in (tmp_path / "kernels_cpu_float32_spec.md").read_text()


def _child_stopped_after_one_case(monkeypatch, stop: str):
    """subprocess.run as an isolated child that wrote its first case's row and was then stopped with the parent
    (gpu_session.sh's timeout signals the whole process group): ``stop`` "sigterm" (the signal itself, through the
    parent's handler) or "interrupt" (^C)."""
    def run(argv, timeout):
        out, tag = Path(argv[argv.index("--out") + 1]), argv[argv.index("--tag") + 1]
        case = BENCH.select_cases(argv[argv.index("--cases") + 1])[0]
        row = BENCH.make_row(case, case.shape, {"copy_gbps": 1.0, "matmul_tflops": 1.0}, 2, 2)
        row["providers"]["torch_paged"] = {"provider": "torch_paged", "status": "ok", "ok": True, "median_us": 5.0}
        (out / f"kernels_{tag}.json").write_text(json.dumps({"cases": [row], "metadata": {}}))
        if stop == "interrupt":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler raises before this ends
        raise AssertionError("SIGTERM did not stop the parent")

    monkeypatch.setattr(BENCH.subprocess, "run", run)


@pytest.mark.parametrize("stop, raised", [("sigterm", SystemExit), ("interrupt", KeyboardInterrupt)])
def test_a_stopped_isolated_run_keeps_what_its_child_measured(tmp_path, monkeypatch, stop, raised):
    """The parent wrote its report only after its child exited, so a benchmark cut by gpu_session.sh's timeout left
    no JSON at all. Stopped, it writes the child's finished case and the one it was on, then stops; its SIGTERM
    handler is the caller's again afterwards."""
    _child_stopped_after_one_case(monkeypatch, stop)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(raised):
        BENCH.main(["--device", "cpu", "--dtype", "float32", "--isolate", "yes", "--providers", "torch_paged",
                    "--cases", "spec,p4k_16", "--out", str(tmp_path), "--commit", "test"])
    report = json.loads((tmp_path / "kernels_cpu_float32_spec_p4k_16.json").read_text())
    assert not report["metadata"]["complete"]
    assert [r["key"] for r in report["cases"]] == ["p4k_16"]  # the first case; spec, never begun, is left out
    assert report["cases"][0]["providers"]["torch_paged"]["median_us"] == 5.0
    assert signal.getsignal(signal.SIGTERM) is handler


def test_bench_exits_1_when_deft_fails_its_check(tmp_path, monkeypatch):
    """The run's status says whether deft passed: gpu_session.sh's phase went on reporting success."""
    monkeypatch.setitem(BENCH.SETUP, "deft", lambda ctx: BENCH.Prepared(fn=lambda: torch.zeros_like(ctx.q)))
    rc = BENCH.main(["--device", "cpu", "--dtype", "float32", "--shrink", "64", "--isolate", "no",
                     "--providers", "deft,torch_paged", "--cases", "spec", "--cpu-reps", "1",
                     "--out", str(tmp_path), "--commit", "test"])
    assert rc == 1
    report = json.loads((tmp_path / "kernels_cpu_float32_spec.json").read_text())
    assert BENCH.failed_deft_cells(report) == ["spec (failed_check)"]
    # a case whose deft cell is not there at all (the isolating parent rebuilds a row the child never wrote) fails too
    del report["cases"][0]["providers"]["deft"]
    assert BENCH.failed_deft_cells(report) == ["spec (missing)"]
    report["metadata"]["providers"].remove("deft")  # a run not asked for deft checks none
    assert BENCH.failed_deft_cells(report) == []
    # an isolated run's child exits 0 all the same: its parent reads any other status as a death mid-case
    watchdogs = []

    class Recorded(BENCH._Watchdog):
        def __init__(self, enabled):
            super().__init__(enabled)
            watchdogs.append(self)

    monkeypatch.setattr(BENCH, "_Watchdog", Recorded)
    assert BENCH.main(["--child", "--device", "cpu", "--dtype", "float32", "--shrink", "64", "--isolate", "no",
                       "--providers", "deft,torch_paged", "--cases", "spec", "--cpu-reps", "1",
                       "--out", str(tmp_path), "--tag", "part1", "--commit", "test", "--case-timeout", "600"]) == 0
    # its watchdog disarmed once the cases are done: armed, it would end this process (a pytest worker) later
    assert len(watchdogs) == 1 and watchdogs[0].deadline is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_bench_script_refuses_cuda_without_a_gpu(tmp_path, monkeypatch):
    """It ran on the CPU instead and, with its default output folder then benchmarks/results, rewrote the committed
    kernels_h200.json with a CPU run's numbers."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OUT", raising=False)
    with pytest.raises(SystemExit, match="--device cuda, but torch sees no CUDA device here"):
        BENCH.main(["--cases", "spec", "--providers", "torch_paged"])
    assert BENCH.parse_args([]).out == Path("bench_kernels_out")  # never the committed results' folder
    assert list(tmp_path.iterdir()) == []
