"""The bundled tiny Llama (models/tiny-llama-deft) is sharp enough to catch a wrong attention.

Random weights at HF's default scale (or SGLang's `--load-format dummy`) make every attention row
almost uniform, so greedy tokens barely depend on the context and a decode backend that reads the
wrong KV slots can still produce the expected tokens. These tests show, with HF transformers in fp32
on CPU, that the bundled weights don't have that weakness: for a 300-token shared prompt with six
branches, changing one early prompt token, or hiding one early KV token from every query, changes
the greedy continuation of every branch, and the branches' continuations differ from each other.
The variants with real models' attention heads (``make_tiny_model.write_variant``, which the GPU
end-to-end check runs to put the Hopper kernel under the same test) keep those properties.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_model_module, script_module

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models" / "tiny-llama-deft"

transformers = pytest.importorskip("transformers")

PROMPT = "The quick brown fox jumps over the lazy dog while the cat sleeps by the warm fire. " * 20
PROMPT_TOKENS = 300
BRANCHES = [" Answer A:", " Answer B:", " Then", " So the", " First,", " Finally"]
NEW_TOKENS = 12


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Hundreds of tiny single-token forwards: thread hand-offs cost more than they save
    # (measured: 30 s with 2 threads on a busy 2-core machine, 8 s with 1).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return transformers.AutoTokenizer.from_pretrained(str(MODEL_DIR))


@pytest.fixture(scope="module")
def model():
    m = transformers.AutoModelForCausalLM.from_pretrained(
        str(MODEL_DIR), dtype=torch.float32, attn_implementation="eager")
    return m.eval()


@pytest.fixture(scope="module")
def prompt_ids(tok):
    ids = tok(PROMPT)["input_ids"][:PROMPT_TOKENS]
    assert len(ids) == PROMPT_TOKENS
    return ids


def greedy(model, tok, prompt_ids, hidden_key=None):
    """Greedy continuations of every branch; `hidden_key`: a prompt position no query may attend to
    (what a decode backend that skipped one shared KV slot would compute)."""
    outs = []
    for suffix in BRANCHES:
        ids = list(prompt_ids) + tok(suffix)["input_ids"]
        mask = torch.ones(1, len(ids), dtype=torch.long)
        if hidden_key is not None:
            mask[0, hidden_key] = 0
        # Explicit positions: a 0 in the mask must not shift the RoPE positions.
        x, pos, past, new = torch.tensor([ids]), torch.arange(len(ids)).unsqueeze(0), None, []
        with torch.no_grad():
            for _ in range(NEW_TOKENS):
                out = model(input_ids=x, attention_mask=mask, position_ids=pos,
                            past_key_values=past, use_cache=True)
                past = out.past_key_values
                new.append(int(out.logits[0, -1].argmax()))
                x = torch.tensor([[new[-1]]])
                pos = pos[:, -1:] + 1
                mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], dim=1)
        outs.append(new)
    return outs


def greedy_no_cache(model, prompt_ids, n, hidden_key=None):
    """The same without a KV cache (every step recomputes the whole sequence): checks `greedy`."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            mask = torch.ones(1, len(ids), dtype=torch.long)
            if hidden_key is not None:
                mask[0, hidden_key] = 0
            pos = torch.arange(len(ids)).unsqueeze(0)
            logits = model(input_ids=torch.tensor([ids]), attention_mask=mask, position_ids=pos).logits
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt_ids):]


@pytest.fixture(scope="module")
def reference(model, tok, prompt_ids):
    return greedy(model, tok, prompt_ids)


def test_config_and_size():
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    assert cfg["num_attention_heads"] == 8 and cfg["num_key_value_heads"] == 2  # GQA 4
    assert cfg["head_dim"] == 32 and cfg["num_hidden_layers"] == 3 and cfg["vocab_size"] == 512
    total = sum(f.stat().st_size for f in MODEL_DIR.iterdir())
    assert total < 2 * 1024 * 1024, total


def test_weights_match_the_seeded_generator():
    make_tiny_model = make_tiny_model_module()
    from safetensors.torch import load_file

    want = make_tiny_model.make_state_dict(MODEL_DIR)
    have = load_file(str(MODEL_DIR / "model.safetensors"))
    assert want.keys() == have.keys()
    for k in want:
        assert torch.equal(want[k], have[k]), k


def test_attention_is_sharp(model, prompt_ids):
    with torch.no_grad():
        att = model(torch.tensor([prompt_ids]), output_attentions=True).attentions
    for layer, a in enumerate(att):
        # a: [1, heads, q, k]; the median query puts most of its weight on one key.
        med = a[0, :, 32:].max(-1).values.median().item()
        assert med > 0.6, (layer, med)


def test_branches_differ_and_decode_to_one_printable_line(tok, reference):
    assert len({tuple(o) for o in reference}) == len(BRANCHES), reference
    for out in reference:
        assert len(out) == NEW_TOKENS  # no EOS: the lm_head row of </s> is zero
        text = tok.decode(out)
        assert text and all(32 <= ord(c) < 127 for c in text), repr(text)


@pytest.mark.parametrize("pos", [3, 40])
def test_one_early_prompt_token_changes_every_branch(model, tok, prompt_ids, reference, pos):
    changed = list(prompt_ids)
    changed[pos] = 100 if prompt_ids[pos] != 100 else 101
    outs = greedy(model, tok, changed)
    same = [i for i, (a, b) in enumerate(zip(reference, outs)) if a == b]
    assert not same, f"branches {same} ignored a change of prompt token {pos}"


def test_cached_greedy_matches_full_recompute(model, tok, prompt_ids, reference):
    ids = list(prompt_ids) + tok(BRANCHES[2])["input_ids"]
    assert greedy_no_cache(model, ids, 6) == reference[2][:6]
    hidden = greedy(model, tok, prompt_ids, hidden_key=5)
    assert greedy_no_cache(model, ids, 6, hidden_key=5) == hidden[2][:6]


def test_hiding_one_shared_kv_token_changes_every_branch(model, tok, prompt_ids, reference):
    outs = greedy(model, tok, prompt_ids, hidden_key=5)
    same = [i for i, (a, b) in enumerate(zip(reference, outs)) if a == b]
    assert not same, f"branches {same} did not notice KV token 5 missing"


# The variants the GPU end-to-end check runs: Llama-3-8B's heads, Llama-3.2-1B's, head_dim 256, GQA 7, and
# the Qwen2, Qwen3, Qwen3-MoE, Mixtral, Phi-3, Gemma-2 and Gemma-3 families with their models' heads.
GPU_E2E = script_module("gpu_e2e")
VARIANTS = ([("llama", heads) for heads in GPU_E2E.TINY_VARIANTS.values()] + list(GPU_E2E.FAMILY_VARIANTS.values())
            + list(GPU_E2E.WINDOW_VARIANTS.values()))


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: "{}_q{}_kv{}_d{}".format(v[0], *v[1][:3]))
def variant(request, tmp_path_factory):
    architecture, heads = request.param
    out = make_tiny_model_module().write_variant(tmp_path_factory.mktemp("variant"), *heads,
                                                 architecture=architecture)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == heads[:3]
    assert cfg["hidden_size"] == (heads[3] if len(heads) > 3 else 128)
    m, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    # every weight the family's model has is in the file, and nothing else (a misnamed one would be left at
    # transformers' random init here and at SGLang's dummy values or a load error in a server)
    assert not any(info.values()), info
    assert type(m).__name__ == cfg["architectures"][0]
    return m.eval()


def test_a_variant_with_real_heads_is_as_sharp(variant, tok, prompt_ids):
    """What makes the end-to-end check catch a wrong attention: one changed prompt token or one hidden
    KV token changes every branch. (Two branches may continue alike: " Answer A:" and " Answer B:" did
    at 32 / 8 heads of 128, which takes nothing from that.)"""
    test_attention_is_sharp(variant, prompt_ids)
    reference = greedy(variant, tok, prompt_ids)
    assert all(len(o) == NEW_TOKENS and all(32 <= ord(c) < 127 for c in tok.decode(o)) for o in reference)
    changed = list(prompt_ids)
    changed[3] = 100 if prompt_ids[3] != 100 else 101
    for what, outs in (("a change of prompt token 3", greedy(variant, tok, changed)),
                       ("KV token 5 missing", greedy(variant, tok, prompt_ids, hidden_key=5))):
        same = [i for i, (a, b) in enumerate(zip(reference, outs)) if a == b]
        assert not same, f"branches {same} did not notice {what}"


def test_variant_heads_are_checked(tmp_path):
    with pytest.raises(ValueError, match="KV dividing Q"):
        make_tiny_model_module().write_variant(tmp_path, 32, 6, 128)
    with pytest.raises(ValueError, match="not a multiple of the 28 q heads"):
        make_tiny_model_module().write_variant(tmp_path, 28, 4, 128)
    with pytest.raises(ValueError, match="architecture 'mamba'"):
        make_tiny_model_module().write_variant(tmp_path, 8, 2, 32, architecture="mamba")
    with pytest.raises(ValueError, match="must be 32 x 128"):
        make_tiny_model_module().write_variant(tmp_path, 32, 8, 128, architecture="mixtral")


def test_family_variants_keep_the_llama_attention_weights(tmp_path):
    """The families change the model code around attention, not the attention's weights: a failure in one
    family but not the Llama variant then points at that family's code path."""
    from safetensors.torch import load_file

    make_tiny_model = make_tiny_model_module()
    for family, heads in GPU_E2E.FAMILY_VARIANTS.values():
        llama, other = (load_file(str(make_tiny_model.write_variant(tmp_path / f"{family}_{arch}", *heads,
                                                                    architecture=arch) / "model.safetensors"))
                        for arch in ("llama", family))
        attn = "model.layers.2.self_attn."
        if family == "phi3":  # stored fused, in q, k, v order
            qkv = torch.cat([llama[attn + f"{x}_proj.weight"] for x in "qkv"])
            assert torch.equal(other[attn + "qkv_proj.weight"], qkv)
        for name in ("o_proj",) if family == "phi3" else ("q_proj", "k_proj", "v_proj", "o_proj"):
            key = attn + f"{name}.weight"
            assert torch.equal(other[key], llama[key]), (family, key)
        dense = family not in (*make_tiny_model.MOE_WEIGHTS, "phi3")
        assert ("model.layers.0.mlp.gate_proj.weight" in other) == dense


def test_check_mode_catches_weights_that_differ_from_the_generator(tmp_path, capsys):
    """``make_tiny_model.py --check``: passes on the bundled weights, fails on one changed value."""
    from safetensors.torch import load_file, save_file

    make_tiny_model = make_tiny_model_module()
    assert make_tiny_model.main(["--check"]) == 0
    for f in MODEL_DIR.iterdir():
        if f.name != "model.safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    sd = load_file(str(MODEL_DIR / "model.safetensors"))
    w = sd["model.layers.1.self_attn.k_proj.weight"].clone()
    w[3, 5] = w[3, 5] * 1.01 + 0.01
    sd["model.layers.1.self_attn.k_proj.weight"] = w
    save_file(sd, str(tmp_path / "model.safetensors"))
    capsys.readouterr()
    assert make_tiny_model.main(["--check", "--model-dir", str(tmp_path)]) == 1
    assert "differs from the generator in 1 tensors: ['model.layers.1.self_attn.k_proj.weight']" in capsys.readouterr().out
    # --check with --heads wrote the variant and said nothing of the check: refused, nothing written
    with pytest.raises(SystemExit):
        make_tiny_model.main(["--check", "--heads", "32,8,128", "--out", str(tmp_path / "variant")])
    assert "--check compares the bundled model" in capsys.readouterr().err
    assert not (tmp_path / "variant").exists()


def test_parse_heads():
    make_tiny_model = make_tiny_model_module()
    assert make_tiny_model.parse_heads("32,8,128") == [32, 8, 128]
    assert make_tiny_model.parse_heads("28,4,128,112") == [28, 4, 128, 112]
    for bad in ("32,8", "1,2,3,4,5"):
        with pytest.raises(ValueError, match="three or four integers"):
            make_tiny_model.parse_heads(bad)


def test_phi3_variant_computes_what_its_llama_twin_does(tmp_path, prompt_ids):
    """Phi-3's fused q/k/v and gate/up weights are the Llama variant's in the order the model splits them: the
    two give the same logits (transformers, fp32; the 2047-token sliding window is longer than the prompt)."""
    make_tiny_model = make_tiny_model_module()
    logits = {}
    for arch in ("llama", "phi3"):
        path = make_tiny_model.write_variant(tmp_path / arch, 32, 32, 96, architecture=arch)
        m = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                              attn_implementation="eager").eval()
        with torch.no_grad():
            logits[arch] = m(torch.tensor([prompt_ids[:64]])).logits
    assert torch.allclose(logits["phi3"], logits["llama"], atol=1e-4, rtol=0), \
        (logits["phi3"] - logits["llama"]).abs().max()
