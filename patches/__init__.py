"""Changes to SGLang internals that its hooks cannot reach; each checks the SGLang version first.

- ``forward_batch_reqs``: ``ForwardBatch.deft_reqs``, the batch's live requests, for the KV tree.
"""
