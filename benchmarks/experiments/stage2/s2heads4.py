"""Stage 2 with 4 heads of one query per program: s2heads2.py's kernel, launched with HEADS=4 by
ab_stage2.py (row 32 of kernel_experiments_h200.md)."""
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("s2heads2", Path(__file__).with_name("s2heads2.py"))
_heads = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_heads)

_tree_decode_stage2 = _heads._tree_decode_stage2
HEADS_PER_PROGRAM = 4
