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
    """On CUDA the pinned ring's buffers wrap and grow under queued copies; on the CPU (no pinned memory) the
    same calls take the plain copy, so this case checks only the uploads' contents there: the CPU suite covers
    the ring's reuse rule in test_a_pinned_buffer_is_not_rewritten_before_its_copy_is_done."""
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
    # per device, not per device type: a ring of one GPU's stream and events must not serve another's uploads
    # (making a ring calls no CUDA; its pinned buffers come at the first upload)
    assert thread_staging_ring("cuda:0") is not thread_staging_ring("cuda:1")
    assert thread_staging_ring("cuda:1") is thread_staging_ring(torch.device("cuda", 1))


class Stream:
    """Stands in for the CUDA stream and its events: a non-blocking copy into a ``QueuedOut`` is queued,
    not done; an event recorded after it completes it when synchronized, reading its source then, as
    the DMA would. A buffer rewritten before that delivers the new bytes."""

    def __init__(self, slots: int):
        self.slots, self.queued, self.uploads, self.log, self.events = slots, [], 0, [], []
        self.device_stream = object()  # torch.cuda.current_stream of the ring's device
        stream = self

        class Event:
            def __init__(self):
                self.copies = []
                stream.events.append(self)

            def record(self, on=None):
                assert on is stream.device_stream  # the ring device's stream, which the copies went to
                self.copies, stream.queued = stream.queued, []
                self.at, stream.uploads = stream.uploads, stream.uploads + 1

            def synchronize(self):
                if stream.uploads - self.at < stream.slots:  # the ring's point is never to wait on these
                    stream.log.append(f"waited for the copy of upload {self.at} at upload {stream.uploads}")
                self.complete()

            def complete(self):
                for dest, src in self.copies:
                    torch.Tensor.copy_(dest.as_subclass(torch.Tensor), src)
                self.copies = []

        self.Event = Event

    def drain(self):
        """The device catches up: every copy still queued is done."""
        assert not self.queued  # every copy was followed by its event
        for event in self.events:
            event.complete()

    def out(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        stream = self

        class QueuedOut(torch.Tensor):
            @classmethod
            def __torch_function__(cls, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func is torch.Tensor.copy_ and kwargs.get("non_blocking"):
                    stream.queued.append(args)
                    return args[0]
                return super().__torch_function__(func, types, args, kwargs)

        return torch.full((n,), -1, dtype=dtype).as_subclass(QueuedOut)


def test_a_pinned_buffer_is_not_rewritten_before_its_copy_is_done(monkeypatch):
    """The page-locked path (CUDA's) on the CPU, its copies queued until an event completes them: every
    upload delivers what was sent, and a buffer is written again only after the copy that last read it
    is done, that copy being ``slots`` uploads old (the ring takes its buffers in turn, so it never
    waits on a copy just queued)."""
    slots = 3
    stream = Stream(slots)
    empty = torch.empty
    monkeypatch.setattr(staging.torch, "empty",
                        lambda *a, pin_memory=False, **kw: empty(*a, **kw))  # no pinned allocator on CPU
    monkeypatch.setattr(staging.torch.cuda, "Event", stream.Event)
    # The current device may be another GPU than the ring's: its stream is not the one the copies went to.
    monkeypatch.setattr(staging.torch.cuda, "current_stream",
                        lambda device=None: stream.device_stream if device == torch.device("cuda:1") else object())
    ring = staging.PinnedStagingRing("cuda:1", slots=slots)  # the device's type picks the path; no CUDA call
    rng = np.random.default_rng(0)
    sent, outs = [], []
    for i, n in enumerate([7, 5, 9, 3, 8, 6, 4, 70_000, 2, 11]):  # 70_000: a buffer grows
        host = rng.integers(-2**31, 2**31 - 1, n, dtype=np.int64 if i % 2 else np.int32)
        outs.append(ring.upload(host, stream.out(n + i % 2, torch.from_numpy(host).dtype)))
        sent.append(host.copy())
        host[:] = 0  # the caller may reuse its array as soon as upload returns
    stream.drain()
    assert stream.log == [] and len(stream.events) == slots
    for host, out in zip(sent, outs):
        got = out.as_subclass(torch.Tensor).numpy()
        np.testing.assert_array_equal(got[:len(host)], host)
        assert (got[len(host):] == -1).all()


def test_an_odd_int32_upload_that_grows_a_pinned_buffer_arrives_whole(monkeypatch):
    """A buffer grown to exactly an odd int32 upload's bytes: its int32 view must cover every element (one cut to
    8-byte multiples was an element short, and the upload raised in the scheduler)."""
    stream = Stream(2)
    empty = torch.empty
    monkeypatch.setattr(staging.torch, "empty", lambda *a, pin_memory=False, **kw: empty(*a, **kw))
    monkeypatch.setattr(staging.torch.cuda, "Event", stream.Event)
    monkeypatch.setattr(staging.torch.cuda, "current_stream", lambda device=None: stream.device_stream)
    ring = PinnedStagingRing("cuda:1", slots=2)
    host = np.arange(70_001, dtype=np.int32)
    out = ring.upload(host, stream.out(70_001, torch.int32))
    stream.drain()
    np.testing.assert_array_equal(out.as_subclass(torch.Tensor).numpy(), host)
