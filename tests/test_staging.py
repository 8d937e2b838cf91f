"""PinnedStagingRing: what a plan's host-to-device upload delivers, however the ring's buffers are reused."""
import threading

import numpy as np
import pytest
import torch

import sglang_deft.kernels.staging as staging
from sglang_deft.kernels.staging import PinnedStagingRing, thread_staging_ring

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_uploads_arrive_intact_while_the_ring_wraps(device):
    ring = PinnedStagingRing(device, slots=2)
    rng = np.random.default_rng(0)
    sent, outs = [], []
    if device == "cuda":  # a queued kernel keeps the copies waiting: a buffer reused too early shows
        torch.cuda._sleep(50_000_000)
    for i, n in enumerate([5, 4096, 1, 70_000, 3, 17, 9000, 2]):  # sizes that grow a buffer and shrink again
        host = rng.integers(-2**31, 2**31 - 1, n, dtype=np.int64 if i % 3 == 0 else np.int32)
        out = None
        if i % 2:  # into a larger tensor: only its head is written
            out = torch.full((n + 7,), -1, dtype=torch.from_numpy(host).dtype, device=device)
        outs.append(ring.upload(host, out))
        sent.append(host.copy())
        host[:] = 0  # the caller may reuse its array as soon as upload returns
    for i, (host, out) in enumerate(zip(sent, outs)):
        got = out.cpu().numpy()
        assert got.dtype == host.dtype
        np.testing.assert_array_equal(got[:len(host)], host)
        if i % 2:
            assert (got[len(host):] == -1).all()


def test_thread_rings_are_per_thread_and_per_device():
    mine = thread_staging_ring("cpu")
    assert thread_staging_ring(torch.device("cpu")) is mine
    other = []
    t = threading.Thread(target=lambda: other.append(thread_staging_ring("cpu")))
    t.start()
    t.join()
    assert other[0] is not mine


class InFlightCopy:
    """Stands in for torch.cuda.Event: record() marks the slot's buffer as read by a queued copy (a
    snapshot of what it must deliver); the copy counts as done only at synchronize()."""

    def __init__(self, ring, slot, log, clock):
        self.ring, self.slot, self.log, self.clock = ring, slot, log, clock
        self.buf = self.snap = self.at = None

    def record(self):
        self.check()  # the last copy from this slot was never waited for: was its buffer rewritten?
        self.buf, self.at = self.ring._buffers[self.slot], self.clock[0]
        self.snap = self.buf.clone()

    def check(self):
        if self.buf is not None and not torch.equal(self.buf, self.snap):
            self.log.append(("rewritten in flight", self.slot))

    def synchronize(self):
        if self.buf is not None and self.clock[0] - self.at < len(self.ring._buffers):
            self.log.append(("waited for a recent copy", self.slot))  # the ring's point is not to
        self.check()
        self.buf = None


def test_a_pinned_buffer_is_not_rewritten_before_its_copy_is_done(monkeypatch):
    """The page-locked path (CUDA only) with its copies emulated: a buffer is written again only
    after the copy that last read it is done, and that copy is ``slots`` uploads old (the ring takes
    its buffers in turn, so it never waits on a copy just queued)."""
    empty = torch.empty
    monkeypatch.setattr(staging.torch, "empty",
                        lambda *a, pin_memory=False, **kw: empty(*a, **kw))  # no pinned allocator on CPU
    slots, log, clock = 3, [], [0]
    ring = staging.PinnedStagingRing("cpu", slots=slots)
    ring._pinned = True  # the CUDA path: ring buffers, events
    ring._events = [InFlightCopy(ring, i, log, clock) for i in range(slots)]
    rng = np.random.default_rng(0)
    for i, n in enumerate([7, 5, 9, 3, 8, 6, 4, 70_000, 2, 11]):
        clock[0] = i
        host = rng.integers(-2**31, 2**31 - 1, n, dtype=np.int64 if i % 2 else np.int32)
        out = ring.upload(host)
        np.testing.assert_array_equal(out.numpy(), host)
    for event in ring._events:
        event.check()
    assert log == []
