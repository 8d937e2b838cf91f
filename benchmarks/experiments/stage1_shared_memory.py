"""Shared memory of the portable Triton stage-1 kernel on GPUs before Hopper, compiled on a machine without one.

``stage1_config`` picks the kernel's shape from the head dim and tile rows (measured on the H200), not from the
GPU; a GPU with less shared memory per block than a config needs fails at its first launch with the need and the
limit (``launch_stage1``). This compiles every config the server can pick, for sm_80 (A100: 163 KB per block),
sm_86 and sm_89 (A10/L4/L40S/RTX: 99 KB), in each q/KV dtype pair those GPUs decode, and prints what each needs:
    PYTHONPATH=/tmp/t36:/tmp/overlay .venv/bin/python benchmarks/experiments/stage1_shared_memory.py 80,86,89
(/tmp/t36: an unpacked Triton 3.6 wheel, the GPU host's version, as compile_sm90.py says; /tmp/overlay:
``python3 scripts/gpu_e2e.py --make-overlay /tmp/overlay``, so that ``sglang_deft.kernels`` imports.)
STAGES=n or BLOCK=n override the config's pipeline depth or KV block. One JSON line per config.
"""
import importlib
import itertools
import json
import os
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

FLOATS = ("sm_scale", "logit_cap", "cap_scale", "cap_clamp")  # the kernels' float scalars (compile_sm90.py's)

td = importlib.import_module("sglang_deft.kernels.tree_decode")  # the module (the package exports a function of its name)

POINTER = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float8_e5m2: "*fp8e5",
           torch.float8_e4m3fn: "*fp8e4nv"}
DTYPES = [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
          (torch.bfloat16, torch.float8_e5m2), (torch.bfloat16, torch.float8_e4m3fn)]


def compile_config(sm: int, q_dtype, kv_dtype, head_dim: int, large_rows: int, stages: int = 0, block: int = 0):
    cfg = td.stage1_config(head_dim, large_rows)
    consts = dict(GROUP=4, HEAD_DIM=head_dim, BLOCK_D=td.padded_head_dim(head_dim), LARGE_M=large_rows,
                  SMALL_M=td.SMALL_ROWS, LARGE_N=block or cfg.block_n_large, SMALL_N=block or cfg.block_n_small,
                  USE_CAP=0, IEEE=int(q_dtype == torch.float32), TILES=0)
    pointers = dict(Q=POINTER[q_dtype], K=POINTER[kv_dtype], V=POINTER[kv_dtype], kv_indices="*i32", qperm="*i32",
                    items="*i32", counts="*i32", partial_out="*fp32", partial_lse="*fp32")
    params = td._tree_decode_stage1.arg_names
    sig = {p: "constexpr" if p in consts else pointers.get(p, "fp32" if p in FLOATS else "i32")
           for p in params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params)
             if sig[p].startswith("*") or (sig[p] == "i32" and p.startswith("stride"))}
    row = dict(sm=sm, q=str(q_dtype).removeprefix("torch."), kv=str(kv_dtype).removeprefix("torch."),
               head_dim=head_dim, large_rows=large_rows, warps=cfg.num_warps, stages=stages or cfg.num_stages,
               block=block or cfg.block_n_large, triton=triton.__version__)
    try:
        compiled = triton.compile(ASTSource(td._tree_decode_stage1, sig, consts, attrs),
                                  target=GPUTarget("cuda", sm, 32),
                                  options=dict(num_warps=cfg.num_warps, num_stages=row["stages"]))
        row["shared_bytes"] = compiled.metadata.shared
    except Exception as e:  # a dtype the target lacks (fp8e4nv before sm_89): the server refuses it at startup
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[-1][:160]}"
    return row


def main() -> None:
    sms = [int(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "80,86,89").split(",")]
    stages, block = int(os.environ.get("STAGES", 0)), int(os.environ.get("BLOCK", 0))
    for sm, (q, kv), d, rows in itertools.product(sms, DTYPES, [64, 128, 256], [64, 128]):
        print(json.dumps(compile_config(sm, q, kv, d, rows, stages, block)), flush=True)


if __name__ == "__main__":
    main()
