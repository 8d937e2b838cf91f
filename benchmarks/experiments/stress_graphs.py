"""Replays one CUDA graph of tree_decode (merge in the same launch) thousands of times per case, with
each case's plan written into the captured fixed-capacity buffers (as the backend does), checking the
output bitwise against an eager run and against the fp32 reference. Exits 1 on a mismatch; a hang is
caught by the caller's timeout."""
import sys, time, torch
sys.path.insert(0, "benchmarks")
from bench_kernels import T, _kernels, check
K = _kernels()
dev = torch.device("cuda")
cases = {c.key: c for c in T.all_cases()}
N = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
POOL = 1 << 17
cap = K.PlanCapacity(max_queries=320, max_kv_tokens=1 << 17, max_items=800, max_partials=8192, max_merge=8192)
torch.manual_seed(0)
q = torch.randn(320, 32, 128, device=dev, dtype=torch.bfloat16)
k = torch.randn(POOL, 8, 128, device=dev, dtype=torch.bfloat16)
v = torch.randn_like(k)
out = torch.zeros_like(q)
scale = 128 ** -0.5
g = plan = None
bad = 0
t0 = time.time()
for key in ["p4k_16", "p4k_64", "p16k_64", "p1k_256", "tree3", "nosharing", "spec"] * 2:
    shape = cases[key].shape
    tree = T.build_tree(shape, POOL)
    kt = K.KVTree(tree.kv_indices.to(dev), tree.node_indptr, tree.node_parent, tree.query_node)
    if plan is None:
        plan = K.plan_tree_decode(kt, 32, 8, 128, capacity=cap)
        K.tree_decode(q, k, v, plan, scale, out=out)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            K.tree_decode(q, k, v, plan, scale, out=out)
    else:
        K.plan_tree_decode(kt, 32, 8, 128, reuse=plan)
    B = shape.num_queries
    eager = K.tree_decode(q[:B], k, v, plan, scale)
    out.fill_(float("nan"))
    for rep in range(N):
        g.replay()
        if rep % 500 == 499:
            torch.cuda.synchronize()
            if not torch.equal(out[:B], eager):
                bad += 1
                print(key, "replay", rep, "differs from eager", flush=True)
                break
    torch.cuda.synchronize()
    ref = K.attention_reference(q[:B], k, v, kt, scale)
    same = torch.equal(out[:B], eager)
    bad += not same
    print(key, f"{N} replays, equal to eager: {same}, check {check(out[:B], ref)}, t={time.time() - t0:.1f}s",
          flush=True)
print("stress", "FAILED" if bad else "passed")
sys.exit(1 if bad else 0)
