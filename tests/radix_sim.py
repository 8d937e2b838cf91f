"""Real SGLang memory objects driven through the scheduler's calls, without a model.

Builds a real ``RadixCache`` (or ``ChunkCache``) over a real ``ReqToTokenPool`` and
``TokenToKVPoolAllocator`` on CPU and real ``Req``s, and moves them through the life cycle the
scheduler gives them in SGLang 0.5.10.post1, call for call:

* admit: ``req.init_next_round_input(tree_cache)`` (``match_prefix`` up to ``len(fill_ids) - 1``
  tokens; may split a node), ``tree_cache.inc_lock_ref(req.last_node)`` (``PrefillAdder``);
* prefill: ``req_to_token_pool.alloc``, token slots from the allocator, row = prefix_indices +
  new slots (``alloc_for_extend`` / ``write_cache_indices``);
* prefill result: append the sampled token, ``tree_cache.cache_unfinished_req(req)``
  (``process_batch_result_prefill``). With the overlap scheduler this runs *after* the next decode
  batch is launched: ``prefill(..., overlap=True)`` keeps it pending until ``flush()``;
* decode step: one slot per request written at ``row[seq_len]``, ``seq_len += 1``
  (``prepare_for_decode`` / ``alloc_for_decode``), then the sampled token is appended;
* finish: ``tree_cache.cache_finished_req(req)`` and ``req_to_token_pool.free(req)``
  (``release_kv_cache``); retract: the same without inserting, then ``req.reset_for_retract()``.

With ``page_size`` > 1 the cache and allocator are the paged ones (``--page-size``), and slots come as
``alloc_for_extend`` / ``alloc_for_decode`` take them: ``alloc_extend`` / ``alloc_decode`` after the
request's last slot (``last_loc``), so a request's partial page fills before it takes a new one.

Only the model is missing: sampled tokens come from a seeded generator. Only a ``ScheduleBatch``
is not used (it needs a model config and server args); its bookkeeping for these objects is the
few lines above.
"""
from __future__ import annotations

import itertools

import torch

from sglang.srt.managers.schedule_batch import Req
from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator, TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.chunk_cache import ChunkCache
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixCache
from sglang.srt.sampling.sampling_params import SamplingParams

_rid = itertools.count()


class RadixSim:
    def __init__(self, *, cache: str = "radix", max_reqs: int = 64, max_context: int = 512,
                 kv_slots: int = 8192, vocab: int = 50, seed: int = 0, page_size: int = 1):
        self.req_to_token_pool = ReqToTokenPool(size=max_reqs, max_context_len=max_context, device="cpu",
                                                enable_memory_saver=False)
        self.page_size = page_size
        if page_size == 1:
            self.allocator = TokenToKVPoolAllocator(size=kv_slots, dtype=torch.float32, device="cpu", kvcache=None,
                                                    need_sort=False)
        else:
            self.allocator = PagedTokenToKVPoolAllocator(size=kv_slots, page_size=page_size, dtype=torch.float32,
                                                         device="cpu", kvcache=None, need_sort=False)
        params = CacheInitParams(disable=cache == "disabled", req_to_token_pool=self.req_to_token_pool,
                                 token_to_kv_pool_allocator=self.allocator, page_size=page_size)
        self.tree_cache = ChunkCache(params) if cache == "chunk" else RadixCache(params)
        self.kv_slots = kv_slots
        self.vocab = vocab
        self.gen = torch.Generator().manual_seed(seed)
        self.seq_len: dict[str, int] = {}  # rid -> tokens whose KV slots are in the row
        self._marker = vocab  # fresh() tokens start above the random tokens' range
        self._pending: list[Req] = []  # prefilled, cache_unfinished_req not yet run (overlap)

    @property
    def req_to_token(self) -> torch.Tensor:
        return self.req_to_token_pool.req_to_token

    def tokens(self, n: int) -> list[int]:
        return torch.randint(0, self.vocab, (n,), generator=self.gen).tolist()

    def fresh(self, n: int) -> list[int]:
        """n random tokens starting with one never used before: no other prompt continues the same way."""
        self._marker += 1
        return [self._marker] + self.tokens(n - 1)

    def new_req(self, input_ids: list[int], max_new_tokens: int = 1 << 20) -> Req:
        return Req(rid=f"r{next(_rid)}", origin_input_text="", origin_input_ids=list(input_ids),
                   sampling_params=SamplingParams(max_new_tokens=max_new_tokens))

    def prefill(self, reqs: list[Req], overlap: bool = False) -> list[Req]:
        for req in reqs:
            req.init_next_round_input(self.tree_cache)
            self.tree_cache.inc_lock_ref(req.last_node)
        assert self.req_to_token_pool.alloc(reqs) is not None
        for req in reqs:
            prefix = len(req.prefix_indices)
            total = len(req.fill_ids)
            slots = self._alloc_after(req.prefix_indices[-1:], prefix, total)
            assert slots is not None, "KV pool exhausted: raise kv_slots"
            row = req.req_pool_idx
            self.req_to_token_pool.write((row, slice(0, prefix)), req.prefix_indices)
            self.req_to_token_pool.write((row, slice(prefix, total)), slots)
            req.kv_committed_len = req.kv_allocated_len = total
            self.seq_len[req.rid] = total
            req.output_ids.append(self.tokens(1)[0])
        self._pending.extend(reqs)
        if not overlap:
            self.flush()
        return reqs

    def flush(self) -> None:
        """The prefill results' processing: cache_unfinished_req for every pending request."""
        for req in self._pending:
            self.tree_cache.cache_unfinished_req(req)
        self._pending.clear()

    def _alloc_after(self, last_slot: torch.Tensor, have: int, want: int) -> torch.Tensor | None:
        """Slots for positions [have, want) of one request whose last slot so far is ``last_slot`` (empty:
        none yet). Paged: ``alloc_extend`` continues the request's partial page, as the scheduler's does."""
        if self.page_size == 1:
            return self.allocator.alloc(want - have)
        last_loc = last_slot.to(torch.int64) if len(last_slot) else torch.tensor([-1], dtype=torch.int64)
        prefix, seq = torch.tensor([have], dtype=torch.int64), torch.tensor([want], dtype=torch.int64)
        return self.allocator.alloc_extend(prefix, prefix, seq, seq, last_loc, want - have)

    def prepare_decode(self, reqs: list[Req]) -> torch.Tensor:
        """One decode step's memory side; returns the batch's seq_lens (host, int64)."""
        if self.page_size == 1:
            slots = self.allocator.alloc(len(reqs))
        else:
            seq = torch.tensor([self.seq_len[r.rid] for r in reqs], dtype=torch.int64)
            last_loc = self.req_to_token[self.req_pool_indices(reqs), seq - 1].to(torch.int64)
            slots = self.allocator.alloc_decode(seq + 1, seq + 1, last_loc)
        assert slots is not None, "KV pool exhausted: raise kv_slots"
        for req, slot in zip(reqs, slots.tolist()):
            n = self.seq_len[req.rid]
            self.req_to_token_pool.write((req.req_pool_idx, n), slot)
            self.seq_len[req.rid] = n + 1
            req.kv_committed_len += 1
            req.kv_allocated_len += 1
        return torch.tensor([self.seq_len[r.rid] for r in reqs], dtype=torch.int64)

    def finish_decode(self, reqs: list[Req]) -> None:
        """The decode step's result: each request gets its sampled token."""
        for req, tok in zip(reqs, self.tokens(len(reqs))):
            req.output_ids.append(tok)

    def req_pool_indices(self, reqs: list[Req]) -> torch.Tensor:
        return torch.tensor([r.req_pool_idx for r in reqs], dtype=torch.int64)

    def finish(self, req: Req) -> None:
        """release_kv_cache: the request's tokens go into the radix tree (or are freed)."""
        self.tree_cache.cache_finished_req(req)
        self.req_to_token_pool.free(req)
        del self.seq_len[req.rid]

    def retract(self, reqs: list[Req]) -> None:
        """``retract_all`` (``/pause_generation`` with ``mode=retract``): each request's KV is released
        without inserting its decoded tokens, its row freed, its state reset for a new prefill."""
        for req in reqs:
            self.tree_cache.cache_finished_req(req, is_insert=False)
            self.req_to_token_pool.free(req)
            del self.seq_len[req.rid]
            req.reset_for_retract()

    def run_to_cache(self, input_ids: list[int]) -> None:
        """What ``fork()`` and ``n > 1`` do first: send the prefix with max_new_tokens=0 to cache it."""
        req = self.new_req(input_ids, max_new_tokens=0)
        self.prefill([req], overlap=True)
        self._pending.remove(req)  # finished at prefill: release_kv_cache, not cache_unfinished_req
        self.finish(req)

    def evict_all_unlocked(self) -> None:
        self.tree_cache.evict(EvictParams(num_tokens=self.kv_slots))


def join_random_forks(sim: RadixSim, rng, bases: list[list[int]], running: list[Req], forks: int, extra: list[int],
                      cached: float, copies: list[int], max_running: int = 40) -> None:
    """A random schedule's arrivals: up to ``forks`` prompts, each a prefix of one of ``bases`` plus ``extra``
    fresh tokens (a choice), cached first with probability ``cached``, requested ``copies`` times (a choice);
    prefilled together, with or without the overlap scheduler's delay, and added to ``running`` unless that
    would pass ``max_running``."""
    new = []
    for _ in range(rng.randint(0, forks)):
        base = rng.choice(bases)
        prompt = base[:rng.randint(1, len(base))] + sim.tokens(rng.choice(extra))
        if rng.random() < cached:
            sim.run_to_cache(prompt)
        new += [sim.new_req(prompt) for _ in range(rng.choice(copies))]
    if new and len(running) + len(new) <= max_running:
        sim.prefill(new, overlap=rng.random() < 0.5)
        running += new


def retire_random(sim: RadixSim, rng, running: list[Req], finished: float) -> None:
    """A random schedule's end of a round: the radix cache updated, each running request finished with
    probability ``finished``, and every unlocked node evicted one time in five."""
    sim.flush()
    for req in [r for r in running if rng.random() < finished]:
        running.remove(req)
        sim.finish(req)
    if rng.random() < 0.2:
        sim.evict_all_unlocked()
