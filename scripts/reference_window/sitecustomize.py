"""Imported at startup by every Python process of a ``gpu_e2e.py`` reference server for models with
sliding-window layers (this directory leads its PYTHONPATH; nothing else puts it there).

SGLang 0.5.10.post1's triton decode reads the last ``sliding_window_size`` tokens of a request
(``update_sliding_window_buffer``: ``min(seq_len, w)``), one fewer than its own triton prefill masks in
(``q_pos <= k_pos + w``: w + 1 tokens), FlashInfer's ``window_left = w`` and Hugging Face's models (Gemma-2's
``sliding_window`` counts the current token). deft attends w + 1 tokens; so that its reference computes the same
attention, this server's triton decode steps read w + 1 (its prefill is unchanged). Eager decode only: the CUDA-graph
buffers are sized for w tokens a request, so the server runs with --disable-cuda-graph (gpu_e2e.py adds it).
"""
import sys
import threading

import sglang.srt.layers.attention.triton_backend as _triton_backend
from sglang.version import __version__ as _sglang_version

if _sglang_version != "0.5.10.post1":
    raise RuntimeError(f"scripts/reference_window patches SGLang 0.5.10.post1's triton decode window, not {_sglang_version}")

_decoding = threading.local()
_update = _triton_backend.update_sliding_window_buffer
_init = _triton_backend.TritonAttnBackend.init_forward_metadata


def _update_sliding_window_buffer(window_kv_indptr, req_to_token, sliding_window_size, *args, **kwargs):
    if getattr(_decoding, "on", False):
        sliding_window_size += 1
    return _update(window_kv_indptr, req_to_token, sliding_window_size, *args, **kwargs)


def _init_forward_metadata(self, forward_batch):
    _decoding.on = forward_batch.forward_mode.is_decode()
    try:
        return _init(self, forward_batch)
    finally:
        _decoding.on = False


_triton_backend.update_sliding_window_buffer = _update_sliding_window_buffer
_triton_backend.TritonAttnBackend.init_forward_metadata = _init_forward_metadata
# Python's startup swallows an exception raised here (it prints "Error in sitecustomize" and goes on), so
# gpu_e2e.py requires this line in the server's log instead (MARKER there).
print("sglang-deft reference_window: triton decode reads its prefill's window (w + 1 tokens)", file=sys.stderr,
      flush=True)
