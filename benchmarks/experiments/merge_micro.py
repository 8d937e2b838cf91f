"""Isolates the merge: the fused kernel launched with no attention items (merge programs only, no
waiting: variant 2) against the stage-2 kernel, on each case's partials, both as CUDA graphs."""
import sys, dataclasses, torch, triton.testing
sys.path.insert(0, "benchmarks")
from bench_kernels import T, _kernels
import importlib
K = _kernels()
TD = importlib.import_module(K.__name__ + ".tree_decode")
dev = torch.device("cuda")
cases = {c.key: c for c in T.all_cases()}
for key in ["p4k_16", "p4k_64", "p16k_64", "p1k_256", "tree3", "nosharing", "spec"]:
    c = cases[key]; shape = c.shape
    pool = max(2 * T.runs_needed(shape) * T.DEFAULT_RUN, 1 << 16)
    tree = T.build_tree(shape, pool)
    torch.manual_seed(0)
    q = torch.randn(shape.num_queries, 32, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(pool, 8, 128, device=dev, dtype=torch.bfloat16); v = torch.randn_like(k)
    kt = K.KVTree(tree.kv_indices.to(dev), tree.node_indptr, tree.node_parent, tree.query_node)
    plan = K.plan_tree_decode(kt, 32, 8, 128)
    out = K.tree_decode(q, k, v, plan, 128 ** -0.5)
    ref_out = out.clone()
    res = {}
    cfg = TD.stage1_config(128, plan.large_rows)
    # merge programs only: counts of attention items set to 0 (b = program index)
    saved = plan.counts.clone()
    plan.counts[0] = 0; plan.counts[1] = 0
    o2 = torch.zeros_like(out)
    variants = [("mv2_p16", dict(merge_variant=2)), ("mv2_p8", dict(merge_variant=2, merge_block_p=8)),
                ("mv2_p32", dict(merge_variant=2, merge_block_p=32))]
    fns = [(n, (lambda kw=kw: TD.launch_stage1(q, k, v, plan, 128 ** -0.5, 0.0, dataclasses.replace(cfg, **kw), o2)))
           for n, kw in variants] + [("stage2", lambda: TD.launch_stage2(plan, o2))]
    for name, fn in fns:
      try:
        fn(); torch.cuda.synchronize()
        same = torch.equal(o2, ref_out)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        res[name] = (round(triton.testing.do_bench(g.replay, rep=50, return_mode="median") * 1e3, 1), same)
        o2.zero_()
      except Exception as e:
        res[name] = str(e)[:200]
    plan.counts.copy_(saved)
    print(key, res, flush=True)
