"""Session 24: a cascade of FlashInfer's own kernels built by hand for the shared trees, against deft in the
same process: every node with two or more queries is cut into chunks of CHUNK tokens, all of them one
batch prefill over the paged KV (page size 1, the benchmark's pool and slots, each chunk a request whose
rows are the node's queries); each query's private tail is one batch decode (tensor cores); the partials
are gathered per query and merged by ``flashinfer.merge_states``. Not one of issue 3's baselines (its
cascade is FlashInfer's MultiLevelCascadeAttentionWrapper, one level per depth, which does not split a
long shared level): the check that a user combining FlashInfer's kernels does not beat deft.
Median us of one step in one CUDA graph, L2 flushed (sweep_stage1.graph_time); each output checked when
built and again after every configuration was timed.
    CASES=p4k_16,p4k_64,p16k_64,p1k_256,tree3 OUT=$OUT python3 benchmarks/experiments/chunked_cascade.py
"""
import importlib
import json
import os
import sys
import traceback
from pathlib import Path

import flashinfer
import torch
import triton.testing

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import sweep_stage1 as S  # noqa: E402

K = S.K
PATH_NODES = importlib.import_module(K.__name__ + ".reference").path_nodes


def build(case, chunk: int, backend: str, ws: torch.Tensor):
    c, tree, dev = case.case, case.tree, case.q.device
    indptr, qnode = tree.node_indptr.tolist(), tree.query_node.tolist()
    kv = tree.kv_indices
    users = [[] for _ in range(tree.num_nodes)]  # each node's queries, in query order
    for b, path in enumerate(PATH_NODES(tree)):
        for n in path:
            users[n].append(b)
    rows, qo_indptr, kv_indptr, kv_parts, partials = [], [0], [0], [], [[] for _ in qnode]
    tails = {}
    for n, us in enumerate(users):
        lo, hi = indptr[n], indptr[n + 1]
        if not us or hi == lo:
            continue
        if len(us) == 1:
            assert us[0] not in tails, "one private node per query in these trees"
            tails[us[0]] = n
            continue
        for s in range(lo, hi, chunk):
            e = min(s + chunk, hi)
            for b in us:
                partials[b].append(len(rows))
                rows.append(b)
            qo_indptr.append(len(rows))
            kv_parts.append(kv[s:e])
            kv_indptr.append(kv_indptr[-1] + e - s)
    B = len(qnode)
    tail_q = sorted(tails)
    assert tail_q == list(range(B)), "every query has its own tail in these trees"
    n_pre = len(rows)
    for b in tail_q:
        partials[b].append(n_pre + b)
    S_ = {len(p) for p in partials}
    assert len(S_) == 1, "the merge takes the same number of partials per query"
    i32 = dict(dtype=torch.int32, device=dev)
    pre = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws[0], "NHD", backend=backend)
    pre.plan(torch.tensor(qo_indptr, **i32), torch.tensor(kv_indptr, **i32), torch.cat(kv_parts).to(torch.int32),
             torch.ones(len(kv_parts), **i32), c.num_qo_heads, c.num_kv_heads, c.head_dim, 1, causal=False,
             sm_scale=case.scale, q_data_type=case.q.dtype, kv_data_type=case.k.dtype)
    t_indptr = [0]
    t_idx = []
    for b in tail_q:
        n = tails[b]
        t_idx.append(kv[indptr[n]:indptr[n + 1]])
        t_indptr.append(t_indptr[-1] + indptr[n + 1] - indptr[n])
    dec = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws[1], "NHD", use_tensor_cores=True)
    dec.plan(torch.tensor(t_indptr, **i32), torch.cat(t_idx).to(torch.int32), torch.ones(B, **i32),
             c.num_qo_heads, c.num_kv_heads, c.head_dim, 1, pos_encoding_mode="NONE", sm_scale=case.scale,
             q_data_type=case.q.dtype, kv_data_type=case.k.dtype)
    rows_t = torch.tensor(rows, dtype=torch.long, device=dev)
    gather = torch.tensor(partials, dtype=torch.long, device=dev)  # [B, S]
    q, kvc = case.q, (case.k.unsqueeze(1), case.v.unsqueeze(1))  # [pages, page size 1, kv heads, dim]

    def fn():
        o_pre, l_pre = pre.run(q.index_select(0, rows_t), kvc, return_lse=True)
        o_dec, l_dec = dec.run(q, kvc, return_lse=True)
        o_all, l_all = torch.cat([o_pre, o_dec]), torch.cat([l_pre, l_dec])
        o, _ = flashinfer.merge_states(o_all[gather], l_all[gather])
        return o
    return fn, {"prefill_requests": len(kv_parts), "prefill_rows": n_pre, "partials_per_query": S_.pop()}


report = {"gpu": torch.cuda.get_device_name(), "flashinfer": flashinfer.__version__, "cases": {}}
out_path = Path(os.environ.get("OUT", "/tmp")) / "chunked_cascade.json"
for bench_case in S.select_cases(os.environ.get("CASES", "p4k_16,p4k_64,p16k_64,p1k_256,tree3")):
    case = S.Case(bench_case, torch.device("cuda"))
    res = report["cases"].setdefault(bench_case.key, {})
    plan = K.plan_tree_decode(case.tree, case.case.num_qo_heads, case.case.num_kv_heads, case.case.head_dim)
    o = torch.empty_like(case.q)
    fns = {"deft": lambda plan=plan, o=o: K.tree_decode(case.q, case.k, case.v, plan, case.scale, out=o)}
    fns["deft"]()
    res["deft_check"] = S.check(o, case.ref)
    for backend in ("fa2", "fa3"):
        for chunk in (256, 512, 1024, 2048):
            name = f"{backend}_{chunk}"
            try:
                # each configuration its own workspaces, so that no later plan can touch an earlier one's
                ws = [torch.empty(128 << 20, dtype=torch.uint8, device="cuda") for _ in range(2)]
                fn, info = build(case, chunk, backend, ws)
                res[name + "_info"] = info
                res[name + "_check"] = S.check(fn(), case.ref)
                fns[name] = fn
            except Exception as e:  # noqa: BLE001 - a configuration that fails is a result
                res[name + "_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                traceback.print_exc()
    for n, fn in fns.items():
        try:
            res[n + "_us"] = S.graph_time(fn)
        except Exception as e:  # noqa: BLE001 - not capturable: time it eagerly and say so
            res[n + "_graph_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            torch.cuda.synchronize()
            res[n + "_eager_us"] = triton.testing.do_bench(fn, rep=100, return_mode="median") * 1e3
        if n != "deft":  # checked again after every configuration was planned and timed
            res[n + "_check_after"] = S.check(fn(), case.ref)
    print(bench_case.key, {n: round(v, 1) for n, v in res.items() if n.endswith("_us")},
          {n: v["ok"] for n, v in res.items() if "_check" in n}, flush=True)
    json.dump(report, open(out_path, "w"), indent=1)
