"""Changes to SGLang internals that its hooks cannot reach; each checks the SGLang version first.

- ``forward_batch_reqs``: ``ForwardBatch.deft_reqs``, the batch's live requests, for the KV tree.
- ``cuda_graph_replay``: ``CudaGraphRunner.can_run`` lets the decode backend plan a CUDA-graph
  replay from the step's ForwardBatch (replay itself gets none), or send the step to eager mode.
- ``warmup_dummy_run``: ``ModelRunner._dummy_run`` (FlashInfer's autotune at startup) is marked, so that the
  decode backend can tell its request-less decode batch from a real one.

Each first checks the installed SGLang: its release, and the source of each function it wraps or relies on
(``sglang_version``); then installs its wrapper with ``wrapping.wrap_once``.
"""
