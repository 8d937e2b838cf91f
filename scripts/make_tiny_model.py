"""Write the bundled tiny Llama's seeded weights: models/tiny-llama-deft/model.safetensors.

Usage:
    python scripts/make_tiny_model.py            # (re)write the weights next to config.json
    python scripts/make_tiny_model.py --check    # regenerate in memory, compare with the file
    python scripts/make_tiny_model.py --heads 32,8,128 --out /tmp/tiny-d128   # a variant, see below
    python scripts/make_tiny_model.py --heads 32,4,128 --architecture qwen3_moe --out /tmp/tiny-qwen3-moe

Variants (``--heads Q,KV,D[,HIDDEN]``, ``write_variant``): the same model, tokenizer and scales with
other attention heads, written to another directory (never shipped: a few MB, regenerated in seconds).
The hidden size stays 128 unless given; transformers requires it to be a multiple of the q heads
(28 heads: 112).
They exist because the bundled model's head_dim 32 runs deft's portable Triton kernel on the GPU,
while real models' heads (64, 128, 256) run the Hopper kernel: a variant with Llama-3-8B's 32 q /
8 kv heads of 128 puts the shipped kernel under the same context-sensitive end-to-end check
(scripts/gpu_e2e.py ``tiny-d128``). The sharpness below does not depend on the heads: the std of
q.k / sqrt(head_dim) is QK_STD**2 * hidden whatever head_dim is (10 at hidden 112, 11.5 at 128). Above a
hidden size of 128 the q/k weights shrink (``qk_std``) to keep it at 11.5: at 512, QK_STD would give 46, and
scores that far apart in float16 (an absolute precision of ~0.06 at 100) tie often enough that two correct
kernels' roundings pick different keys.

A variant may also take another model family's architecture (``--architecture``, ``ARCHITECTURES``), so
that the decode path is checked under the model code SGLang runs for that family, not only its Llama:
Qwen2 (q/k/v biases), Qwen3 (an RMSNorm over each head of q and k, whose weights are set to
qk_std(hidden) * sqrt(hidden) so that the scores keep the same spread), the mixture-of-experts Qwen3-MoE and
Mixtral (the dense MLP replaced by EXPERTS experts, EXPERTS_PER_TOKEN of them per token, with a router), and
Phi-3 (q/k/v and gate/up stored fused, as its checkpoints are; a sliding_window of 2047 in the config, as
Phi-3-mini-4k's, which SGLang's Llama class that serves Phi-3 does not apply), Gemma-2 (sliding-window
attention on every even layer, logit soft caps, GeGLU and tied embeddings; its scales, ``GEMMA2_*``, differ)
and Gemma-3 (Gemma-2's stream and windows with an RMSNorm over each head of q and k, and no soft caps).
The attention weights are the Llama variant's, drawn in the same order (the Gemmas' values read no bias
channel); what the families add is drawn from a second generator.

The model exists so that a wrong decode attention changes the tokens. HF's default init
(std 0.02) and SGLang's `--load-format dummy` (uniform +-1e-3) make every attention row almost
uniform: greedy tokens then hardly depend on the context, and a backend that attends to the wrong
KV slots still produces the "right" text. So the scales here are chosen on purpose:

- embeddings N(0, 1): each token's hidden state is far from the others';
- q_proj / k_proj N(0, 0.3): with 128 inputs of unit RMS, q.k / sqrt(head_dim) has a standard
  deviation of about 11 (0.3**2 * 128), so each attention row is close to one-hot and the token it
  picks depends on the keys of the whole context (tests/test_tiny_model.py shows one changed token
  early in a 300-token prompt changes the continuation of every branch);
- v / o / MLP weights with standard deviation 1/sqrt(fan_in): the residual stream stays O(1);
- lm_head N(0, 0.3) on the tokens that decode to printable ASCII (logits spread about +-3.4).
  The other ids -- the special tokens (<s>, </s>, <unk>), the byte tokens of control characters,
  newlines and lone non-ASCII bytes, and the ids past the tokenizer's 326 (the vocabulary is padded
  to 512) -- must never be produced, also when sampling: a "bias channel" does it. Hidden
  dimension 0 of every embedding is the constant +3 and no layer writes it (row 0 of every o_proj
  and down_proj is zero), so after the final RMSNorm it is always positive; the lm_head rows of the
  excluded ids are -10 on that dimension and 0 elsewhere, so their logits sit far below the
  printable ones (about -15 against +-3.4). Generations therefore run to `max_tokens` (no EOS) and
  the (meaningless) text is printable ASCII on one line.

Weights are drawn in float32 from one seeded torch.Generator (CPU, draw order fixed below) and
stored as bfloat16: bf16 upcasts to fp32 exactly, so the fp32 CPU runs and the bf16 GPU runs use
the same numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "tiny-llama-deft"
SEED = 20240402  # DeFT's arXiv id, 2404.00242
QK_STD = 0.3
LM_HEAD_STD = 0.3
BIAS_DIM = 0        # hidden dimension that carries a constant (see the docstring)
BIAS_VALUE = 3.0    # its value in every embedding
EXCLUDED_LOGIT_WEIGHT = -10.0  # lm_head weight on BIAS_DIM for the ids never to produce
EXPERTS, EXPERTS_PER_TOKEN = 4, 2  # the MoE families' experts
EXPERT_INTERMEDIATE = 128  # Qwen3-MoE's moe_intermediate_size; Mixtral's experts take intermediate_size (256)
QWEN2_BIAS_STD = 0.5  # Qwen2's q/k/v biases
# The router's logits have this std, so that which experts a token takes is rarely a near-tie: a routing
# decision is a step function of the hidden state, and where two experts' logits nearly tie, the rounding of
# two correct attention kernels picks different experts, changes that token's K/V in the later layers by
# O(1) and every step after it. At std 1 SGLang's own two GPU decode backends parted that way at steps that
# were no near-tie of the output tokens (H200, fp16, f152b1c), which the end-to-end criterion reads as an
# unusable noise floor.
ROUTER_LOGIT_STD = 8.0

# Model families a variant can take: the config fields that make SGLang (and transformers) run that family's
# model code. Qwen2 and Qwen3 configs carry a sliding_window that use_sliding_window=False leaves unused.
ARCHITECTURES = {
    "llama": {},
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", use_sliding_window=False),
    "qwen3_moe": dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", use_sliding_window=False,
                      num_experts=EXPERTS, num_experts_per_tok=EXPERTS_PER_TOKEN,
                      moe_intermediate_size=EXPERT_INTERMEDIATE, norm_topk_prob=True, decoder_sparse_step=1,
                      mlp_only_layers=[]),
    "mixtral": dict(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=EXPERTS,
                    num_experts_per_tok=EXPERTS_PER_TOKEN),
    # pad_token_id: Phi3Config's default (32000) lies outside the tiny vocabulary
    "phi3": dict(architectures=["Phi3ForCausalLM"], model_type="phi3", sliding_window=2047, pad_token_id=None),
    # Gemma-2: every even layer attends its last sliding_window tokens (SGLang's sliding_window_size is one
    # less), Gemma-2's logit soft caps, GeGLU, tied embeddings; query_pre_attn_scalar is set to the head dim
    # (write_variant), so that the scores' scale is the Llama's.
    "gemma2": dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2", sliding_window=64,
                   hidden_activation="gelu_pytorch_tanh", hidden_act="gelu_pytorch_tanh", attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0, tie_word_embeddings=True, pad_token_id=None),
    # Gemma-3 (text): Gemma-2's residual stream and scales (GEMMA2_*) with Gemma-3's RMSNorm over each head of q
    # and k and no soft caps; its layers' kinds named by layer_types (Gemma-3's pattern is five sliding layers to
    # one global; three layers here, sliding, global, sliding), its local layers' RoPE base 10000 as Gemma-3's.
    "gemma3": dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", sliding_window=64,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                   hidden_activation="gelu_pytorch_tanh", hidden_act="gelu_pytorch_tanh",
                   attn_logit_softcapping=None, final_logit_softcapping=None, rope_local_base_freq=10000.0,
                   tie_word_embeddings=True, pad_token_id=None),
}
# The families built on Gemma-2's residual stream (their model_type)
GEMMA_FAMILIES = ("gemma2", "gemma3_text")
# Gemma-2's residual stream differs (its layers' outputs are RMS-normalised before they are added, its embeddings
# scaled up by sqrt(hidden), its lm_head the embeddings), and the Llama's scales made its tiny model repeat one or
# two tokens whatever the context. So: embeddings stored 1/sqrt(hidden) as large (they enter at unit RMS); the
# post-layer norms scale the layers' outputs to GEMMA2_OUTPUT_SCALE, so that what the layers read from the context
# outweighs the current token's own embedding, which tied embeddings favour as the next token; and the bias
# channel's constant kept out of the values' and the MLP's inputs (GEMMA2_BIAS_FREE_INPUTS), where the post-layer
# norms scaled it up into one output for every context. Measured with transformers on CPU (HF eager attention):
# the median query's largest attention weight 0.72 / 0.81 / 0.88 in the three layers, and every branch of the
# prompt of tests/test_tiny_model.py changes with one early prompt token or one hidden KV token.
# The ids never to produce get an embedding of GEMMA2_EXCLUDED_EMBEDDING on the bias channel only: their logits
# sit ~40 below the printable ones (before the final soft cap).
GEMMA2_OUTPUT_SCALE = 10.0
GEMMA2_BIAS_FREE_INPUTS = ("self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
GEMMA2_EXCLUDED_EMBEDDING = -30.0
# Each MoE family's checkpoint names: the router, then an expert's (gate, up, down) projections.
MOE_WEIGHTS = {
    "qwen3_moe": ("mlp.gate", "mlp.experts.{e}.", ("gate_proj", "up_proj", "down_proj")),
    "mixtral": ("block_sparse_moe.gate", "block_sparse_moe.experts.{e}.", ("w1", "w3", "w2")),
}


def qk_std(hidden: int) -> float:
    """The q/k weights' std: QK_STD, or less above a hidden size of 128 (the docstring says why)."""
    return QK_STD * math.sqrt(min(1.0, 128 / hidden))


def printable_token_ids(model_dir: Path = MODEL_DIR) -> list[int]:
    """Ids whose text, decoded alone, is non-empty printable ASCII (space included, no newline)."""
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    special = {t["id"] for t in json.loads((model_dir / "tokenizer.json").read_text())["added_tokens"]}
    return [i for i in range(tok.get_vocab_size())
            if i not in special and (s := tok.decode([i])) and all(32 <= ord(c) < 127 for c in s)]


def make_state_dict(model_dir: Path = MODEL_DIR) -> dict[str, torch.Tensor]:
    cfg = json.loads((model_dir / "config.json").read_text())
    hidden = cfg["hidden_size"]
    inter = cfg["intermediate_size"]
    vocab = cfg["vocab_size"]
    n_q = cfg["num_attention_heads"]
    n_kv = cfg["num_key_value_heads"]
    hd = cfg["head_dim"]
    allowed = torch.tensor(printable_token_ids(model_dir))
    assert int(allowed.max()) < vocab

    g = torch.Generator().manual_seed(SEED)

    def normal(shape, std):
        return torch.randn(*shape, generator=g, dtype=torch.float32) * std

    # HF / SGLang Linear weights are [out_features, in_features].
    sd: dict[str, torch.Tensor] = {}
    emb = normal((vocab, hidden), 1.0)
    sd["model.embed_tokens.weight"] = emb
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = torch.ones(hidden)
        sd[p + "self_attn.q_proj.weight"] = normal((n_q * hd, hidden), qk_std(hidden))
        sd[p + "self_attn.k_proj.weight"] = normal((n_kv * hd, hidden), qk_std(hidden))
        sd[p + "self_attn.v_proj.weight"] = normal((n_kv * hd, hidden), 1 / math.sqrt(hidden))
        sd[p + "self_attn.o_proj.weight"] = normal((hidden, n_q * hd), 1 / math.sqrt(n_q * hd))
        sd[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
        sd[p + "mlp.gate_proj.weight"] = normal((inter, hidden), 1 / math.sqrt(hidden))
        sd[p + "mlp.up_proj.weight"] = normal((inter, hidden), 1 / math.sqrt(hidden))
        sd[p + "mlp.down_proj.weight"] = normal((hidden, inter), 1 / math.sqrt(inter))
    # The bias channel: constant in the embeddings, never written by a layer.
    emb[:, BIAS_DIM] = BIAS_VALUE
    for i in range(cfg["num_hidden_layers"]):
        sd[f"model.layers.{i}.self_attn.o_proj.weight"][BIAS_DIM] = 0.0
        sd[f"model.layers.{i}.mlp.down_proj.weight"][BIAS_DIM] = 0.0
    sd["model.norm.weight"] = torch.ones(hidden)
    lm_head = normal((vocab, hidden), LM_HEAD_STD)
    keep = torch.zeros(vocab, dtype=torch.bool)
    keep[allowed] = True
    lm_head[~keep] = 0.0
    lm_head[~keep, BIAS_DIM] = EXCLUDED_LOGIT_WEIGHT
    sd["lm_head.weight"] = lm_head
    add_family_weights(sd, cfg)
    return {k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}


def add_family_weights(sd: dict[str, torch.Tensor], cfg: dict) -> None:
    """What ``cfg``'s model family (``ARCHITECTURES``) has beyond the Llama's weights, in ``sd``: drawn from
    a generator of their own, so that the Llama weights stay the bundled model's draws."""
    family = cfg.get("model_type", "llama")
    if family not in {spec.get("model_type", "llama") for spec in ARCHITECTURES.values()}:
        raise ValueError(f"model_type {family!r}: the tiny model is made for {', '.join(ARCHITECTURES)}")
    g = torch.Generator().manual_seed(SEED + 1)
    hidden, hd = cfg["hidden_size"], cfg["head_dim"]
    if family in GEMMA_FAMILIES:  # tied embeddings: the lm_head's exclusions move into them (GEMMA2_* above)
        sd["model.norm.weight"] = torch.zeros(hidden)
        excluded = sd.pop("lm_head.weight")[:, BIAS_DIM] == EXCLUDED_LOGIT_WEIGHT
        emb = sd["model.embed_tokens.weight"]
        emb[:, torch.arange(hidden) != BIAS_DIM] /= math.sqrt(hidden)
        emb[excluded] = 0.0
        emb[excluded, BIAS_DIM] = GEMMA2_EXCLUDED_EMBEDDING
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        if family == "qwen2":
            for name, heads in (("q", cfg["num_attention_heads"]), ("k", cfg["num_key_value_heads"]),
                                ("v", cfg["num_key_value_heads"])):
                sd[p + f"self_attn.{name}_proj.bias"] = torch.randn(heads * hd, generator=g) * QWEN2_BIAS_STD
        if family in ("qwen3", "qwen3_moe", "gemma3_text"):
            # Normalised heads have unit RMS; this weight gives q and k the spread qk_std gives the Llama's
            # (q.k / sqrt(head_dim) with std qk_std**2 * hidden). Gemma's RMSNorm multiplies by (1 + weight).
            gain = qk_std(hidden) * math.sqrt(hidden)
            for name in ("q_norm", "k_norm"):
                sd[p + f"self_attn.{name}.weight"] = torch.full((hd,), gain - (family == "gemma3_text"))
        if family == "phi3":
            attn, mlp = p + "self_attn.", p + "mlp."
            sd[attn + "qkv_proj.weight"] = torch.cat([sd.pop(attn + f"{x}_proj.weight") for x in "qkv"])
            sd[mlp + "gate_up_proj.weight"] = torch.cat([sd.pop(mlp + f"{x}_proj.weight") for x in ("gate", "up")])
        if family in GEMMA_FAMILIES:  # GemmaRMSNorm multiplies by (1 + weight)
            for name in GEMMA2_BIAS_FREE_INPUTS:
                sd[p + name + ".weight"][:, BIAS_DIM] = 0.0
            for name in ("input_layernorm", "pre_feedforward_layernorm"):
                sd[p + name + ".weight"] = torch.zeros(hidden)
            for name in ("post_attention_layernorm", "post_feedforward_layernorm"):
                sd[p + name + ".weight"] = torch.full((hidden,), GEMMA2_OUTPUT_SCALE - 1)
        if family in MOE_WEIGHTS:
            router, expert, (gate, up, down) = MOE_WEIGHTS[family]
            for name in ("gate_proj", "up_proj", "down_proj"):
                del sd[p + f"mlp.{name}.weight"]
            inter = cfg["moe_intermediate_size"] if family == "qwen3_moe" else cfg["intermediate_size"]
            sd[p + router + ".weight"] = torch.randn(EXPERTS, hidden, generator=g) * (ROUTER_LOGIT_STD
                                                                                     / math.sqrt(hidden))
            for e in range(EXPERTS):
                q = p + expert.format(e=e)
                sd[q + gate + ".weight"] = torch.randn(inter, hidden, generator=g) / math.sqrt(hidden)
                sd[q + up + ".weight"] = torch.randn(inter, hidden, generator=g) / math.sqrt(hidden)
                w_down = torch.randn(hidden, inter, generator=g) / math.sqrt(inter)
                w_down[BIAS_DIM] = 0.0  # the bias channel: no layer writes it
                sd[q + down + ".weight"] = w_down


def parse_heads(text: str) -> list[int]:
    """``Q,KV,D[,HIDDEN]`` (``--heads``, ``SGLANG_DEFT_E2E_HEADS``) as ``write_variant``'s arguments."""
    dims = [int(x) for x in text.split(",")]
    if len(dims) not in (3, 4):
        raise ValueError("give three or four integers")
    return dims


def write_variant(out_dir: Path, num_q_heads: int, num_kv_heads: int, head_dim: int, hidden: int = 128,
                  architecture: str = "llama", config: dict | None = None) -> Path:
    """The bundled model with other attention heads, and maybe another family's architecture
    (``ARCHITECTURES``; ``config``'s fields replace its config's, e.g. ``sliding_window`` or ``layer_types``),
    written to ``out_dir`` (config, tokenizer, weights)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture {architecture!r}: choose from {', '.join(ARCHITECTURES)}")
    if num_q_heads < 1 or num_kv_heads < 1 or head_dim < 1 or num_q_heads % num_kv_heads:
        raise ValueError(f"heads {num_q_heads},{num_kv_heads},{head_dim}: need Q, KV, D >= 1 with KV dividing Q")
    if hidden <= BIAS_DIM or hidden % num_q_heads:
        # transformers' LlamaConfig refuses it on load (SGLang's server then fails at startup)
        raise ValueError(f"hidden size {hidden} is not a multiple of the {num_q_heads} q heads")
    if architecture == "mixtral" and hidden != num_q_heads * head_dim:
        # SGLang's Mixtral ignores the config's head_dim (hidden_size // heads): it would load the weights
        # wrongly (cut to its sizes) or fail
        raise ValueError(f"hidden size {hidden}: SGLang's Mixtral takes head_dim as hidden_size // q heads, "
                         f"so it must be {num_q_heads} x {head_dim}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(MODEL_DIR / name, out_dir / name)
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    cfg.update(num_attention_heads=num_q_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
               hidden_size=hidden, **ARCHITECTURES[architecture])
    if architecture in ("gemma2", "gemma3"):
        cfg["query_pre_attn_scalar"] = head_dim
    cfg.update(config or {})
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
    save_file(make_state_dict(out_dir), str(out_dir / "model.safetensors"),
              metadata={"format": "pt", "generator": "scripts/make_tiny_model.py", "seed": str(SEED),
                        "heads": f"{num_q_heads},{num_kv_heads},{head_dim}", "hidden": str(hidden),
                        "architecture": architecture})
    return out_dir


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    ap.add_argument("--check", action="store_true", help="compare with the existing file, write nothing")
    ap.add_argument("--heads", default=None, metavar="Q,KV,D[,HIDDEN]",
                    help="write a variant with these attention heads to --out instead")
    ap.add_argument("--architecture", default="llama", choices=list(ARCHITECTURES),
                    help="the variant's model family (with --heads)")
    ap.add_argument("--out", type=Path, default=None, help="the variant's directory (with --heads)")
    args = ap.parse_args(argv)
    if (args.heads is None) != (args.out is None):
        ap.error("--heads and --out go together")
    if args.architecture != "llama" and args.heads is None:
        ap.error("--architecture makes a variant: give --heads and --out")
    if args.check and args.heads is not None:  # (it wrote the variant and said nothing of --check)
        ap.error("--check compares the bundled model (--model-dir); a variant (--heads) has no stored file to check")
    if args.heads is not None:
        try:
            dims = parse_heads(args.heads)
            out = write_variant(args.out, *dims, architecture=args.architecture)
        except ValueError as e:
            ap.error(f"--heads {args.heads}: {e}")
        print(f"wrote {out}: {args.architecture}, {dims[0]} q / {dims[1]} kv heads of {dims[2]}, "
              f"hidden {dims[3] if len(dims) > 3 else 128}")
        return 0
    path = args.model_dir / "model.safetensors"
    sd = make_state_dict(args.model_dir)
    if args.check:
        old = load_file(str(path))
        bad = sorted(k for k in sd.keys() | old.keys()
                     if k not in sd or k not in old or not torch.equal(sd[k], old[k]))
        if bad:
            print(f"{path}: differs from the generator in {len(bad)} tensors: {bad[:5]}")
            return 1
        print(f"{path}: matches the generator ({len(sd)} tensors)")
        return 0
    save_file(sd, str(path), metadata={"format": "pt", "generator": "scripts/make_tiny_model.py",
                                       "seed": str(SEED)})
    n = sum(v.numel() for v in sd.values())
    path.chmod(0o644)
    print(f"wrote {path}: {len(sd)} tensors, {n} parameters, {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
