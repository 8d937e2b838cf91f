"""Host-to-device copies of per-step metadata that never wait for the device.

A copy from pageable host memory may wait for the device: the driver stages it through its own
pinned buffer and, per the CUDA runtime's documentation of ``cudaMemcpyAsync``, "may synchronize
with the stream" to do so. A decode step is planned while the previous one still runs (the overlap
scheduler), so such a wait would put a step's device time into the next step's host time. Copies
from page-locked memory are plain DMAs queued on the stream.

:class:`PinnedStagingRing` keeps a few page-locked buffers and uses them in turn. A buffer is
written again only after the device has finished the copy that read it (an event recorded after
that copy); with ``slots`` buffers that copy was queued ``slots`` uploads earlier, so in practice
the event has long completed and the check costs a query.
"""
from __future__ import annotations

import threading

import numpy as np
import torch


class PinnedStagingRing:
    """Uploads host arrays (int32 or int64) to one device through a ring of page-locked buffers."""

    def __init__(self, device: torch.device | str, slots: int = 4) -> None:
        self.device = torch.device(device)
        self._pinned = self.device.type == "cuda"
        self._buffers: list[torch.Tensor | None] = [None] * slots
        self._events: list[torch.cuda.Event | None] = [None] * slots
        self._views: list[dict] = [{} for _ in range(slots)]  # per buffer: dtype -> (tensor, ndarray) of it all
        self._next = 0

    def upload(self, host: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """``host`` (1-D, int32 or int64) on the device, same dtype: written into ``out[:len(host)]``
        when given, else into a new tensor. Asynchronous on CUDA; ``host`` may be reused as soon as
        this returns."""
        n = len(host)
        dtype = _TORCH_DTYPE[host.dtype]
        if out is None:
            out = torch.empty(n, dtype=dtype, device=self.device)
        if not self._pinned:
            out[:n].copy_(torch.from_numpy(host))
            return out
        i = self._next
        self._next = (i + 1) % len(self._buffers)
        event = self._events[i]
        if event is not None:
            event.synchronize()  # the copy that last read this buffer (``slots`` uploads ago) is done
        buf = self._buffers[i]  # bytes
        nbytes = host.nbytes
        if buf is None or buf.numel() < nbytes:
            buf = self._buffers[i] = torch.empty(max(nbytes, 1 << 14, 2 * (0 if buf is None else buf.numel())),
                                                 dtype=torch.uint8, pin_memory=True)
            self._views[i] = {}
        # Whole-buffer views per dtype, made once: each torch view costs microseconds of host time.
        views = self._views[i]
        view = views.get(dtype)
        if view is None:
            t = buf[:buf.numel() // host.itemsize * host.itemsize].view(dtype)
            view = views[dtype] = (t, t.numpy())
        view[1][:n] = host
        (out if out.numel() == n else out[:n]).copy_(view[0][:n], non_blocking=True)
        if event is None:
            event = self._events[i] = torch.cuda.Event()
        # On the stream the copy went to, the current one of the ring's device (not of the current device,
        # which may be another GPU: the event would then not wait for this copy, and the buffer be refilled
        # while it is read).
        event.record(torch.cuda.current_stream(self.device))
        return out


_THREAD_RINGS = threading.local()


def thread_staging_ring(device: torch.device | str) -> PinnedStagingRing:
    """This thread's ring for ``device``, made at its first use: for callers that plan one step and
    keep no state (``plan_tree_decode``), so that each call does not allocate page-locked memory and
    events of its own. Per thread because a ring hands out its buffers in turn without a lock."""
    device = torch.device(device)
    rings = getattr(_THREAD_RINGS, "rings", None)
    if rings is None:
        rings = _THREAD_RINGS.rings = {}
    ring = rings.get(device)
    if ring is None:
        ring = rings[device] = PinnedStagingRing(device)
    return ring


_TORCH_DTYPE = {np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64}
