"""SGLang integration of the DeFT decode path.

Kept free of SGLang imports: ``sglang_deft.kernels`` must import without SGLang, and
``sglang_deft.Engine`` must set the process up before SGLang loads (see ``sglang_deft.engine``).
"""


def __getattr__(name):
    if name == "Engine":
        from sglang_deft.engine import Engine

        return Engine
    raise AttributeError(f"module 'sglang_deft' has no attribute {name!r}")


__all__ = ["Engine"]
