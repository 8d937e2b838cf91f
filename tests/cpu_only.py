"""A marker for tests written for the CPU suite (`make test`): they drive SGLang's CPU ops and the Triton
kernels on CPU buffers (TRITON_INTERPRET=1), which a CUDA build of torch does not run (SGLang registers
its cache ops for CUDA only there). On the GPU host the same paths run on the device in
test_cuda_graph_gpu.py (planner and steady steps, graphed against eager) and test_kernels.py."""
import pytest
import torch

cpu_only = pytest.mark.skipif(torch.cuda.is_available(),
                              reason="a CPU-suite test (CPU ops, kernels on CPU buffers): run it by `make test`")
