"""Session 24: what FlashInfer's prefill kernels (fa2, and fa3 = its Hopper FA3 port) take for the 16k
prefix's shared part alone: 64 queries x 32 q heads attending one contiguous 16k-token KV (8 kv heads of
128, bf16, no gather), split into C equal chunks as C ragged requests that repeat the 64 queries (so the
grid covers the SMs), outputs with their LSE (the merge not included). A reference for what FlashInfer's
Hopper prefill kernels take on the part of prefix 16k x 64 that deft's large tiles compute.
    OUT=$OUT python3 benchmarks/experiments/fa3_reference.py
"""
import json
import os
import traceback
from pathlib import Path

import flashinfer
import torch
import triton.testing

dev = "cuda"
torch.manual_seed(0)
HQ, HKV, D, PREFIX, NQ = 32, 8, 128, 16384, 64
q = torch.randn(NQ, HQ, D, device=dev, dtype=torch.bfloat16)
k = torch.randn(PREFIX, HKV, D, device=dev, dtype=torch.bfloat16)
v = torch.randn_like(k)
# fp32 reference of the whole prefix (all chunks merged) for the output check
qf, kf, vf = q.float(), k.float().repeat_interleave(HQ // HKV, 1), v.float().repeat_interleave(HQ // HKV, 1)
s = torch.einsum("qhd,khd->hqk", qf, kf) * D ** -0.5
ref = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), vf)
report = {"flashinfer": flashinfer.__version__, "gpu": torch.cuda.get_device_name(), "cases": []}
ws = torch.empty(512 << 20, dtype=torch.uint8, device=dev)
for chunks in (8, 16, 32):
    L = PREFIX // chunks
    qq = q.repeat(chunks, 1, 1).contiguous()
    qo_indptr = torch.arange(chunks + 1, device=dev, dtype=torch.int32) * NQ
    kv_indptr = torch.arange(chunks + 1, device=dev, dtype=torch.int32) * L
    for backend in ("fa2", "fa3"):
        entry = {"chunks": chunks, "backend": backend}
        try:
            w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD", backend=backend)
            w.plan(qo_indptr, kv_indptr, HQ, HKV, D, causal=False, q_data_type=torch.bfloat16)
            out, lse = w.run(qq, k, v, return_lse=True)
            # merge the chunks' partials by their LSE to check against the reference (the LSE's base is
            # taken as the one that reproduces the reference: 2 or e)
            lse = lse.view(chunks, NQ, HQ).float()
            m = lse.max(0).values
            for base, exp in (("2", torch.exp2), ("e", torch.exp)):
                wts = exp(lse - m)
                merged = (out.view(chunks, NQ, HQ, D).float() * wts[..., None]).sum(0) / wts.sum(0)[..., None]
                entry["max_abs_err_lse_base_" + base] = float((merged - ref).abs().max())
            entry["us"] = triton.testing.do_bench(lambda: w.run(qq, k, v, return_lse=True), rep=200,
                                                  return_mode="median") * 1e3
        except Exception as e:  # noqa: BLE001 - a backend that does not build or run is a result
            entry["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            traceback.print_exc()
        print(entry, flush=True)
        report["cases"].append(entry)
        json.dump(report, open(Path(os.environ.get("OUT", "/tmp")) / "fa3_reference.json", "w"), indent=1)
