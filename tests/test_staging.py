"""PinnedStagingRing: what a plan's host-to-device upload delivers, however the ring's buffers are reused."""
import threading

import numpy as np
import pytest
import torch

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
