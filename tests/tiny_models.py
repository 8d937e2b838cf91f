"""The repo's tiny model for server tests, or its variant with other attention heads.

``SGLANG_DEFT_E2E_HEADS=Q,KV,D[,HIDDEN]`` makes the server tests that read it (``test_e2e_cpu.py`` and the
modules built on it, and the server part of ``test_cuda_graph_gpu.py``) serve the tiny model's variant
with those heads (``scripts/make_tiny_model.py --heads``: the same seeded, sharp weights). On a GPU the
bundled model's head_dim 32 runs deft's portable Triton stage 1; head dims of 64-256 run the Hopper kernel
that real models get.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "models" / "tiny-llama-deft"


def script_module(name: str):
    """``scripts/<name>.py`` as a module (scripts/ is not a package)."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def make_tiny_model_module():
    return script_module("make_tiny_model")


def tiny_model(heads: str | None) -> Path:
    """The bundled tiny model, or (``heads`` = "Q,KV,D[,HIDDEN]") its variant with those attention heads,
    written to a directory of this process's own (a few seconds)."""
    if not heads:
        return BUNDLED
    make_tiny_model = make_tiny_model_module()
    dims = make_tiny_model.parse_heads(heads)
    return make_tiny_model.write_variant(Path(tempfile.mkdtemp(prefix="sglang_deft_e2e_model_")), *dims)


def server_test_model() -> Path:
    return tiny_model(os.environ.get("SGLANG_DEFT_E2E_HEADS"))


def with_config(directory: Path, model: Path = BUNDLED, **overrides) -> Path:
    """``model`` under its config with ``overrides``, in ``directory``: its other files (weights,
    tokenizer) symlinked, the config written anew."""
    for f in model.iterdir():
        if f.name != "config.json":
            (directory / f.name).symlink_to(f.resolve())
    config = json.loads((model / "config.json").read_text())
    config.update(overrides)
    (directory / "config.json").write_text(json.dumps(config))
    return directory
