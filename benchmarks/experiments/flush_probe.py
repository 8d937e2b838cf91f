"""How the benchmark's L2 flush shapes the times: bench_kernels.py with each timed call also measured
after two other flushes, in the same process and on the same CUDA graph.

``triton.testing.do_bench`` (what bench_kernels.py times with) flushes L2 by *zeroing* a 256 MB buffer
before every call, so the call starts with L2 full of dirty lines that its own loads must write back
to HBM as they evict them. A decode layer in a server starts with L2 holding mostly clean lines (the
previous layer's weights, read-only). This probe times every cell three ways:

* ``zero``: do_bench as bench_kernels.py does (the committed numbers);
* ``read``: the same event loop, flushing by *reading* a 256 MB buffer (a sum: L2 ends up holding
  clean lines of a buffer the call never touches);
* ``zero+read``: zeroing and then reading, to check that the read alone evicts the dirty lines.

On the GPU host (overlay on PYTHONPATH, as scripts/gpu_session.sh builds it):
    python3 benchmarks/experiments/flush_probe.py --out $OUT --tag flush [bench_kernels.py args]
Writes bench_kernels.py's JSON/markdown with ``read_median_us`` and ``zero_read_median_us`` added to
every timed cell; the markdown shows only the ``zero`` numbers.
"""
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import bench_kernels as B  # noqa: E402

_orig_bench = B.bench
_buf = {}


def _event_median_us(fn, flush, reps: int = 200, warmup: int = 20) -> float:
    start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for _ in range(warmup):
        flush()
        fn()
    for i in range(reps):
        flush()
        start[i].record()
        fn()
        end[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(start, end)) * 1e3


def bench(fn, device, args) -> dict:
    r = _orig_bench(fn, device, args)
    if device.type != "cuda":
        return r
    if device not in _buf:
        _buf[device] = (torch.empty(256 << 20, dtype=torch.int8, device=device),
                        torch.ones(64 << 20, dtype=torch.int32, device=device))
    zbuf, rbuf = _buf[device]

    def read():
        rbuf.sum()

    def zero_read():
        zbuf.zero_()
        read()

    r["zero_loop_median_us"] = _event_median_us(fn, zbuf.zero_)  # the zero flush in this loop (vs do_bench)
    r["read_median_us"] = _event_median_us(fn, read)
    r["zero_read_median_us"] = _event_median_us(fn, zero_read)
    print(f"[flush] zero {r['median_us']:.1f} (loop {r['zero_loop_median_us']:.1f}) read {r['read_median_us']:.1f} "
          f"zero+read {r['zero_read_median_us']:.1f} us", flush=True)
    return r


B.bench = bench
if __name__ == "__main__":
    sys.exit(B.main(sys.argv[1:] + ["--isolate", "no"]))
