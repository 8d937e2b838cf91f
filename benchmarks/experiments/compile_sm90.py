"""Compile a Gluon stage-1 kernel for sm_90 on a machine without a GPU: registers, spills, shared memory.

Registers decide how many stage-1 programs an SM holds (the step's speed, `kernel_experiments_h200.md`),
and a Gluon kernel's compile errors only show at compile time, so a variant can be checked here before
it costs device time. Needs a Triton 3.6 tree (the GPU host's version; its wheel ships ptxas) on
PYTHONPATH, e.g. ``pip download triton==3.6.0 --no-deps`` and unzip it to /tmp/t36:
    PYTHONPATH=/tmp/t36 .venv/bin/python benchmarks/experiments/compile_sm90.py kernels/stage1_hopper.py
    PYTHONPATH=/tmp/t36 .venv/bin/python benchmarks/experiments/compile_sm90.py path/to/variant.py \\
        _kernel_name STAGES=3 maxnreg=112
Arguments after the kernel name set its constexprs (NAME=int), the compile option ``maxnreg``, or the KV
cache's type (``KV=fp8e4nv`` or ``KV=fp8e5``: an fp8 cache, converted in the kernel). Pointer and scalar
types follow stage 1's signature (bf16 q/K/V, int32 metadata, fp32 partials); stride
arguments are taken as multiples of 16, as Triton specialises them at run time. Prints ptxas's register,
spill and shared-memory report; the PTX is left in $OUT_PTX (default /tmp/compile_sm90.ptx).
"""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sweep_stage1 import load_module  # noqa: E402

POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "kv_indices": "*i32", "qperm": "*i32", "items": "*i32",
            "counts": "*i32", "partial_out": "*fp32", "partial_lse": "*fp32"}
FLOATS = ("sm_scale", "logit_cap", "cap_scale", "cap_clamp", "cap_mul")  # (the Hopper kernel takes the cap as its two scalars)
# stage1_hopper's launch for Llama-3-8B's attention shape (32 q / 8 kv heads of 128).
CONSTEXPRS = dict(GROUP=4, HEAD_DIM=128, LARGE_M=64, SMALL_M=16, BLOCK=32, STAGES=2, USE_CAP=0, WARPS=4, CONVERT=0)


def main() -> None:
    path = sys.argv[1]
    args = sys.argv[2:]
    name = args.pop(0) if args and "=" not in args[0] else "_tree_decode_stage1_hopper"
    module = load_module(path)
    fn = getattr(module, name)
    consts, options, pointers = dict(CONSTEXPRS), {}, dict(POINTERS)
    consts["SMALL_WGMMA"] = int(getattr(module, "SMALL_TILES_ON_WGMMA", False))  # stage1_hopper.launch's default
    for a in args:
        k, v = a.split("=")
        if k == "KV":
            pointers["K"] = pointers["V"] = f"*{v}"
            consts["CONVERT"] = 1
        else:
            (options if k == "maxnreg" else consts)[k] = int(v)
    if not any(a.startswith("BLOCK_D=") for a in args):  # the head dim padded as stage1_hopper.launch pads it
        consts["BLOCK_D"] = triton.next_power_of_2(consts["HEAD_DIM"])
    options["num_warps"] = consts["WARPS"]
    params = fn.arg_names
    sig = {p: "constexpr" if p in consts else pointers.get(p, "fp32" if p in FLOATS else "i32") for p in params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params)
             if sig[p].startswith("*") or (sig[p] == "i32" and p.startswith("stride"))}
    src = GluonASTSource(fn, sig, {k: v for k, v in consts.items() if k in params}, attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    ptx_path = os.environ.get("OUT_PTX", "/tmp/compile_sm90.ptx")
    with open(ptx_path, "w") as f:
        f.write(compiled.asm["ptx"])
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as out:
        report = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", ptx_path, "-o", out.name],
                                capture_output=True, text=True)
    print(f"{name}: {compiled.metadata.num_warps} warps, {compiled.metadata.shared} B of shared memory")
    print("\n".join(line for line in report.stderr.splitlines() if "spill" in line or "Used" in line))
    if report.returncode:
        sys.exit(report.stderr)


if __name__ == "__main__":
    main()
