"""The soft cap's tanh in four forms: what each costs the Hopper stage 1 and how far each is from tanh.

(rational) Eigen's float32 [13/6] rational with one div.approx, x clamped where tanh is 1 (kernels/tree_decode.py's,
      the Hopper kernel's until 2026-12-07);
(approx) PTX's ``tanh.approx.f32`` (one MUFU op, max relative error about 2^-11, as FlashInfer's soft cap);
(ex2) 1 - 2 / (1 + 2^(2 x log2 e)): two MUFU ops (ex2, rcp) and two FMA-pipe ops, no clamp (saturates to +-1);
      its absolute error (~2e-7) is all of tanh's digits where x -> 0 (a cap far above the scores);
(ex2s) ex2, and below |x| = 0.1 tanh's series to x^5: the Hopper kernel's (kernels/stage1_hopper.py's _soft_cap).

    python3 benchmarks/experiments/soft_cap_forms.py variants DIR   # DIR/stage1_hopper_{rational,approx,ex2}.py
    python3 benchmarks/experiments/soft_cap_forms.py accuracy OUT.json  # GPU: each form against float64's tanh

The variants are kernels/stage1_hopper.py with ``_soft_cap``'s body (tanh of x = score x sm_scale / cap) replaced,
timed against it by ``ab_stage1.py`` with ``CAP=50`` (``run_soft_cap_forms.sh``).
"""
import importlib
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Eigen's float32 tanh: tanh(x) = x R(x^2) for |x| <= 7.905 (kernels/tree_decode.py's constants)
RATIONAL = '''    x = gl.minimum(gl.maximum(s * cap_scale, -7.90531110763549805), 7.90531110763549805)
    x2 = x * x
    num = 4.89352455891786e-03 + x2 * (6.37261928875436e-04 + x2 * (1.48572235717979e-05 + x2 * (
        5.12229709037114e-08 + x2 * (-8.60467152213735e-11 + x2 * (2.00018790482477e-13 + x2 * -2.76076847742355e-16)))))
    den = 4.89352518554385e-03 + x2 * (2.26843463243900e-03 + x2 * (1.18534705686654e-04 + x2 * 1.19825839466702e-06))
    r = gl.inline_asm_elementwise("div.approx.f32 $0, $1, $2;", "=f,f,f", [num, den], dtype=gl.float32, is_pure=True,
                                  pack=1)
    return x * r
'''
APPROX = '''    return gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [s * cap_scale], dtype=gl.float32,
                                     is_pure=True, pack=1)
'''
EX2 = '''    e = gl.exp2(s * (cap_scale * (2.0 * LOG2E)))
    r = gl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [1.0 + e], dtype=gl.float32, is_pure=True,
                                  pack=1)
    return 1.0 - 2.0 * r
'''
FORMS = {"rational": RATIONAL, "approx": APPROX, "ex2": EX2}


def write_variants(out_dir: Path) -> None:
    src = (ROOT / "kernels" / "stage1_hopper.py").read_text()
    # _soft_cap's body: from the end of its docstring to the blank lines before the next decorator.
    pat = re.compile(r'(def _soft_cap\(s, cap_scale\):\n    """.*?"""\n)(.*?)(\n\n@gluon\.jit)', re.S)
    if len(pat.findall(src)) != 1:
        raise SystemExit("kernels/stage1_hopper.py: _soft_cap not found once; update this script")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, body in FORMS.items():
        (out_dir / f"stage1_hopper_{name}.py").write_text(pat.sub(lambda m: m.group(1) + body + m.group(3), src))
        print(out_dir / f"stage1_hopper_{name}.py")


def accuracy(out: Path) -> None:
    import torch
    import triton
    import triton.language as tl

    global _rational, _CLAMP
    sys.path.insert(0, str(ROOT))
    TD = importlib.import_module("kernels.tree_decode")  # the module (the package exports a function of that name)
    _rational, _CLAMP = TD._soft_cap, TD.TANH_CLAMP

    @triton.jit
    def forms(X, Y, n, FORM: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(X + offs, mask=offs < n)
        if FORM == 0:  # the rational on x = s * cap_scale, with cap_scale 1 (tanh(x) itself)
            y = _rational(x, 1.0, _CLAMP)
        elif FORM == 1:
            y = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                          pack=1)
        else:
            e = tl.exp2(x * (2.0 * 1.4426950408889634))
            r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [1.0 + e], dtype=tl.float32,
                                          is_pure=True, pack=1)
            y = 1.0 - 2.0 * r
            if FORM == 3:
                x2 = x * x
                y = tl.where(tl.abs(x) < 0.1, x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0))), y)
        tl.store(Y + offs, y, mask=offs < n)

    x = torch.cat([torch.linspace(-12, 12, 1 << 22, dtype=torch.float64),
                   torch.logspace(-30, 1, 1 << 16, dtype=torch.float64)]).to(torch.float32).cuda()
    exact = torch.tanh(x.double())
    report = {"points": x.numel(), "device": torch.cuda.get_device_name()}
    for i, name in enumerate(("rational", "approx", "ex2", "ex2s")):
        y = torch.empty_like(x)
        forms[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), FORM=i, BLOCK=1024)
        err = (y.double() - exact).abs()
        rel = err / exact.abs().clamp_min(1e-300)
        special = torch.tensor([0.0, float("inf"), -float("inf"), float("nan")], device="cuda")
        ys = torch.empty_like(special)
        forms[(1,)](special, ys, 4, FORM=i, BLOCK=16)
        report[name] = {
            "max_abs_error": err.max().item(),
            # SGLang's cap multiplies tanh by the cap: the capped logit's error (natural units) at Gemma-2's 50
            "max_logit_error_cap50": 50 * err.max().item(),
            "max_rel_error_abs_x_ge_1e-3": rel[x.abs() >= 1e-3].max().item(),
            "max_rel_error": rel[x != 0].max().item(),
            "special_0_inf_-inf_nan": ys.tolist(),
        }
        print(name, report[name], flush=True)
    out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("variants", "accuracy"):
        raise SystemExit(__doc__)
    (write_variants if sys.argv[1] == "variants" else accuracy)(Path(sys.argv[2]))
