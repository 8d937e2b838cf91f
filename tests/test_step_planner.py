"""DecodeStepPlanner: full plans with room after every tail, and steady steps that update the last
plan on the device. Every step's plan is read back from the buffers: each query must read exactly
its req_to_token row, once."""
from __future__ import annotations

import random

import pytest
import torch

from cpu_only import cpu_only
from radix_sim import RadixSim, join_random_forks, retire_random
from sglang_deft.kernels import TreeDecodePlanner
from sglang_deft.kernels.plan import MIN_CHUNK_TOKENS
from sglang_deft.kernels.reference import plan_kv_reads
from sglang_deft.kv_tree_builder import DecodeKVTreeBuilder
from sglang_deft.step_planner import DecodeStepPlanner
from sglang_deft.tree_attention import PlanLimits, new_graph_plan

pytestmark = cpu_only
HQ, HKV, D = 8, 2, 16


def step_planner(sim: RadixSim, slack: int, max_queries: int = 16, kv_capacity: int | None = None,
                 window: int | None = None) -> DecodeStepPlanner:
    limits = PlanLimits(max_items=256, max_partials=512)
    buffers = new_graph_plan(limits, max_queries, kv_capacity or sim.kv_slots, HQ, HKV, D, torch.float32,
                             torch.device("cpu"))
    planner = TreeDecodePlanner(HQ, HKV, D, kv_dtype=torch.float32)
    return DecodeStepPlanner(DecodeKVTreeBuilder(sim.req_to_token), planner, buffers, slack=slack, window=window)


def assert_items_read_tokens(plan) -> None:
    """Every work item of the step reads at least one KV position: plan_kv_reads would take an empty one for "reads
    nothing", where stage 1 divides 0 by 0 and the query's output becomes NaN."""
    items = plan.items[:int(plan.counts[0] + plan.counts[1])]
    assert (items[:, 1] > 0).all(), f"a work item without a KV position: {items.tolist()}"


def check(sim: RadixSim, reqs, seq_lens, step, num_queries: int) -> None:
    assert_items_read_tokens(step.plan)
    got = plan_kv_reads(step.plan)
    assert len(got) == num_queries
    assert step.plan.grid_queries == num_queries  # stage 2 over the step's rows, not the buffers' 16
    for b, (req, n) in enumerate(zip(reqs, seq_lens.tolist())):
        assert sorted(got[b]) == sorted(sim.req_to_token[req.req_pool_idx, :n].tolist()), f"query {b}"
    for b in range(len(reqs), num_queries):
        assert got[b] == []  # padding rows read nothing
    assert step.attended_tokens == int(seq_lens.sum())
    assert step.unique_tokens == len({s for row in got for s in row})


def run(sim, sp, reqs, num_queries=None):
    seq_lens = sim.prepare_decode(reqs)
    step = sp.plan(reqs, seq_lens, num_queries or len(reqs))
    check(sim, reqs, seq_lens, step, num_queries or len(reqs))
    sim.finish_decode(reqs)
    return step.steady


def fork(sim: RadixSim, n: int, prompt_len: int = 50):
    prompt = sim.tokens(prompt_len)
    sim.run_to_cache(prompt)
    return sim.prefill([sim.new_req(prompt + sim.fresh(2 + i)) for i in range(n)])


@pytest.mark.parametrize("page", [1, 4], ids=["page1", "page4"])  # --page-size 4: tails cross pages in steady steps
@pytest.mark.parametrize("padded", [None, 8], ids=["eager", "graph_padded"])
def test_steady_steps_until_the_room_runs_out(padded, page):
    sim = RadixSim(kv_slots=4096, page_size=page)
    sp = step_planner(sim, slack=4)
    reqs = fork(sim, 3) + sim.prefill([sim.new_req(sim.fresh(9))])  # a fork and an unrelated request
    steady = [run(sim, sp, reqs, padded) for _ in range(12)]
    # A new batch is planned without room; once it stayed the same for a step, with room for 4.
    assert steady == [False] + [False, True, True, True, True] * 2 + [False]


def test_a_changed_batch_is_planned_in_full():
    sim = RadixSim(kv_slots=4096)
    sp = step_planner(sim, slack=8)
    reqs = fork(sim, 3)
    assert [run(sim, sp, reqs) for _ in range(4)] == [False, False, True, True]
    late = sim.prefill([sim.new_req(sim.fresh(5))], overlap=True)
    assert [run(sim, sp, reqs + late) for _ in range(3)] == [False, False, True]  # a request joined
    sim.flush()  # cache_unfinished_req: the late request moves to a radix node of its own
    assert [run(sim, sp, reqs + late) for _ in range(2)] == [False, False]
    assert not run(sim, sp, (reqs + late)[::-1])  # another order
    sim.finish(late[0])
    assert [run(sim, sp, reqs[::-1]) for _ in range(3)] == [False, False, True]  # one left
    assert run(sim, sp, reqs[::-1], num_queries=8)  # padded: the same batch, its padding rows only change
    sp.invalidate()
    assert not run(sim, sp, reqs[::-1], num_queries=8)
    assert run(sim, sp, reqs[::-1], num_queries=8)


def test_steady_steps_at_other_row_counts_keep_the_plan():
    """A batch that a graph server replays padded to 8 rows and runs eagerly at its own 3 on some steps: every
    steady step keeps the full plan's work items and the real queries' merge lists whatever the rows, as a planner
    that always has 3 rows does (what keeps a graph server's chunking the eager server's)."""
    sim = RadixSim(kv_slots=4096)
    padded, plain = step_planner(sim, slack=8), step_planner(sim, slack=8)
    reqs = fork(sim, 3)
    for rows in (8, 8, 3, 8, 3, 3, 8, 8):
        seq_lens = sim.prepare_decode(reqs)
        a, b = padded.plan(reqs, seq_lens, rows), plain.plan(reqs, seq_lens, 3)
        check(sim, reqs, seq_lens, a, rows)
        assert a.steady == b.steady and a.plan.num_queries == a.plan.buffers.num_queries == rows
        n = int(b.plan.counts[0] + b.plan.counts[1])
        assert a.plan.counts.tolist() == b.plan.counts[:2].tolist() + [rows]
        assert torch.equal(a.plan.items[:n], b.plan.items[:n])
        merges = int(b.plan.merge_indptr[3])
        assert torch.equal(a.plan.merge_indptr[:4], b.plan.merge_indptr[:4])
        assert (a.plan.merge_indptr[4:rows + 1] == merges).all()  # the padding rows merge nothing
        assert torch.equal(a.plan.merge_slots[:merges], b.plan.merge_slots[:merges])
        sim.finish_decode(reqs)
    assert b.steady
    # More rows than the buffers hold (with room left for steady steps): no step there
    assert padded.plan(reqs, sim.prepare_decode(reqs), 17) is None


def test_a_skipped_step_is_planned_in_full():
    """The plan is for seq_lens one shorter: a batch two tokens further on cannot be advanced."""
    sim = RadixSim(kv_slots=4096)
    sp = step_planner(sim, slack=8)
    reqs = fork(sim, 2)
    assert [run(sim, sp, reqs) for _ in range(3)] == [False, False, True]
    sim.prepare_decode(reqs)  # a step that this planner did not see
    sim.finish_decode(reqs)
    assert not run(sim, sp, reqs)


def test_no_room_near_the_end_of_the_row():
    """The row's width bounds the room: a request three positions from its row's end gets three
    steady steps, not eight."""
    sim = RadixSim(kv_slots=4096, max_context=64)
    sp = step_planner(sim, slack=8)
    prompt = sim.tokens(55)
    reqs = sim.prefill([sim.new_req(prompt + sim.fresh(4)), sim.new_req(sim.fresh(10))])
    assert [run(sim, sp, reqs) for _ in range(2)] == [False, False]  # seq_len 61: 62-64 left in the row
    assert sp._state.room == 3
    assert [run(sim, sp, reqs) for _ in range(3)] == [True] * 3  # up to seq_len 64, the row's end


def test_no_room_in_a_full_pool_means_full_plans():
    """Room counts against the buffers' KV capacity (the pool): without it every step is a full plan."""
    sim = RadixSim(kv_slots=200)
    sp = step_planner(sim, slack=64)  # 3 tails x 64 > what is left of a 200-slot pool
    reqs = fork(sim, 3, prompt_len=40)
    assert [run(sim, sp, reqs) for _ in range(3)] == [False, False, False]
    assert sp._state is None


@pytest.mark.parametrize("spare", [0, 1])
def test_room_leaves_the_last_buffer_entry_to_the_update(spare):
    """The steady update's unused entries (the buffers hold one per possible request) write the KV
    buffer's last entry, so room must end before it: a tree plus its room that fills the buffer
    exactly gets no room; one entry more and it does."""
    slack = 5

    def tree_size_when_room_is_laid_out() -> int:
        sim = RadixSim(kv_slots=4096)
        sp, reqs = step_planner(sim, slack=0), fork(sim, 3, prompt_len=40)
        run(sim, sp, reqs)
        seq_lens = sim.prepare_decode(reqs)
        return sp.plan(reqs, seq_lens, 3).unique_tokens

    capacity = tree_size_when_room_is_laid_out() + 3 * slack + spare
    sim = RadixSim(kv_slots=4096)
    sp = step_planner(sim, slack=slack, kv_capacity=capacity)
    reqs = fork(sim, 3, prompt_len=40)
    assert [run(sim, sp, reqs) for _ in range(4)] == [False, False] + [bool(spare)] * 2


def test_query_without_a_private_tail_gets_no_steady_steps():
    """A query ending on a radix node (no private tail: allowed by the tree, not reached in decode,
    where the new token is private) cannot grow in place, so its batch is planned in full."""
    sim = RadixSim(kv_slots=4096)
    sp = step_planner(sim, slack=8)
    prompt = sim.tokens(12)
    reqs = sim.prefill([sim.new_req(prompt) for _ in range(2)])
    sim.prepare_decode(reqs)
    for lens in ([12, 13], [12, 14]):  # the batch stayed the same: its second plan would get room
        step = sp.plan(reqs, torch.tensor(lens), 2)
        check(sim, reqs, torch.tensor(lens), step, 2)
        assert not step.steady and sp._state is None


def test_window_query_without_a_private_tail_gets_no_steady_steps():
    """As above, in a window plan, where each query that starts before its run also has a private node that grows
    (here query 0's positions 7-8 of the 12-token prompt, its run sharing it from 8): those nodes must not count as
    the missing tail, or a steady step would leave query 0's new token out of its window."""
    sim = RadixSim(kv_slots=4096)
    sp = step_planner(sim, slack=8, window=5)
    prompt = sim.tokens(12)
    reqs = sim.prefill([sim.new_req(prompt) for _ in range(2)])
    sim.prepare_decode(reqs)
    for lens in ([12, 13], [12, 13], [13, 14]):  # the same batch twice (room), then a token on
        lens = torch.tensor(lens)
        step = sp.plan(reqs, lens, 2)
        got = plan_kv_reads(step.plan)
        for b, (req, n) in enumerate(zip(reqs, lens.tolist())):
            assert sorted(got[b]) == sorted(sim.req_to_token[req.req_pool_idx, n - 5:n].tolist()), f"query {b}"
        assert not step.steady and sp._state is None


def test_a_batch_changing_every_step_gets_no_room():
    """Room doubles the nodes a full plan handles: a batch that changes every step (requests joining
    and leaving all the time) is planned without it, as it would get no steady step from it."""
    sim = RadixSim(kv_slots=4096)
    sp = step_planner(sim, slack=8)
    reqs = fork(sim, 4)
    for i in range(4):
        assert not run(sim, sp, reqs[:3 + i % 2])
        assert sp._state is None


def test_seq_lens_incremented_in_place_still_give_steady_steps():
    """Without the overlap scheduler SGLang advances the batch's host seq_lens in place
    (``ScheduleBatch.prepare_for_decode``: ``seq_lens_cpu.add_(1)``), and every ForwardBatch holds
    that same tensor. The planner must keep its own copy of the lengths it planned for: a view of
    that tensor would already hold the next step's lengths, and no step would ever be steady."""
    sim = RadixSim(kv_slots=4096)
    sp = step_planner(sim, slack=4)
    reqs = fork(sim, 3)
    seq_lens = None
    steady = []
    for _ in range(6):
        fresh = sim.prepare_decode(reqs)
        if seq_lens is None:
            seq_lens = fresh  # the batch's one tensor, from now on advanced in place
        else:
            seq_lens.add_(1)
            assert torch.equal(seq_lens, fresh)
        step = sp.plan(reqs, seq_lens, len(reqs))
        check(sim, reqs, seq_lens, step, len(reqs))
        steady.append(step.steady)
        sim.finish_decode(reqs)
    assert steady == [False, False, True, True, True, True]


def test_a_steady_step_writes_only_the_new_slots_and_the_tails_last_item_lengths():
    """The steady update writes through index lists into the plan's packed buffer; anything it wrote
    beyond its targets would corrupt a later step's plan. Every element of the buffers is compared:
    only each tail's next KV entry (and the scratch entry unused update lanes write) and each tail's
    last item's kv_len (+1) may change, and the partial buffers are not touched."""
    sim = RadixSim(kv_slots=4096)
    sp = step_planner(sim, slack=4)
    reqs = fork(sim, 3) + sim.prefill([sim.new_req(sim.fresh(9))])
    assert [run(sim, sp, reqs) for _ in range(2)] == [False, False]  # the second lays out room
    buffers = sp.buffers
    meta0, out0, lse0 = buffers.meta.clone(), buffers.partial_out.clone(), buffers.partial_lse.clone()
    cap = buffers.qperm.numel()
    ops = sp._operands.clone()
    kv_pos, kv_len_field, live = ops[cap:2 * cap], ops[2 * cap:3 * cap], ops[3 * cap:] == 1
    assert int(live.sum()) == len(reqs)  # one update lane per tail

    assert run(sim, sp, reqs)  # a steady step (its plan read back by check())

    base = buffers.meta.storage_offset()

    def meta_index(view: torch.Tensor, flat: torch.Tensor) -> set[int]:
        return {view.storage_offset() - base + int(i) for i in flat}

    allowed_kv = meta_index(buffers.kv_indices, torch.cat([kv_pos[live], torch.tensor([sp._scratch])]))
    lengths = meta_index(buffers.items, kv_len_field[live])
    changed = set((buffers.meta != meta0).nonzero().flatten().tolist())
    assert changed - allowed_kv == lengths  # every tail's last item changed, and nothing else did
    for i in lengths:
        assert int(buffers.meta[i]) == int(meta0[i]) + 1
    assert torch.equal(buffers.partial_out.nan_to_num(), out0.nan_to_num())
    assert torch.equal(buffers.partial_lse.nan_to_num(), lse0.nan_to_num())


@pytest.mark.parametrize("cache", ["radix", "disabled"])
def test_a_preempted_request_back_in_its_row_is_planned_in_full(cache):
    """Priority preemption with the overlap scheduler (SGLang's default): a high-priority request that
    only prefills (max_new_tokens=0, as the prefix request of every fork or n > 1) preempts the whole
    running batch while its last decode step is in flight; that step's token is dropped (the request
    is retracted), so after its re-prefill the request decodes exactly one token further on, as the
    same Req, on the same radix node (its first decode step is built before cache_unfinished_req),
    and, with a request pool no larger than the batch, in the same req_to_token row. But the re-prefill
    wrote new KV slots into that row: a steady step would keep reading the old ones (freed, and by
    then holding another request's KV: a live CPU server with --enable-priority-scheduling
    --max-running-requests 1 gave other tokens from the first step after the preemption on)."""
    sim = RadixSim(cache=cache, max_reqs=1, kv_slots=4096)
    sp = step_planner(sim, slack=8)
    prompt = sim.tokens(40)
    if cache == "radix":
        sim.run_to_cache(prompt)
    batch = sim.prefill([sim.new_req(prompt + sim.fresh(5))])
    assert [run(sim, sp, batch) for _ in range(3)] == [False, False, True]
    row, node = batch[0].req_pool_idx, batch[0].last_node
    seq_lens = sim.prepare_decode(batch)  # a decode step launched ...
    assert sp.plan(batch, seq_lens, 1).steady
    sim.retract(batch)  # ... and its request preempted before its result is processed: its token dropped
    sim.run_to_cache(sim.fresh(30))  # the high-priority, prefill-only request
    sim.prefill(batch, overlap=True)  # re-prefilled: its first decode step is built before cache_unfinished_req
    assert batch[0].req_pool_idx == row and batch[0].last_node is node
    assert sim.seq_len[batch[0].rid] == int(seq_lens[0])  # its next decode step is one token on
    assert not run(sim, sp, batch)  # check(): the plan reads the row's new slots
    assert [run(sim, sp, batch) for _ in range(2)] == [False, True]


def test_a_tail_cut_into_chunks_grows_in_its_last_chunk():
    """An unshared request of 1,200 tokens: the planner cuts its tail into chunks, and steady steps add each
    new token to the last chunk's length alone (what every long generation does), each step reading back
    exactly the request's row."""
    sim = RadixSim(kv_slots=4096, max_context=2048)
    sp = step_planner(sim, slack=4)
    reqs = fork(sim, 2) + sim.prefill([sim.new_req(sim.fresh(1200))])
    lengths = []
    for _ in range(6):
        seq_lens = sim.prepare_decode(reqs)
        step = sp.plan(reqs, seq_lens, len(reqs))
        check(sim, reqs, seq_lens, step, len(reqs))
        sim.finish_decode(reqs)
        items = step.plan.items[:int(step.plan.counts[0] + step.plan.counts[1])].numpy()
        long_tail = items[items[:, 1] >= MIN_CHUNK_TOKENS]  # the shared prompt and the fork's tails are shorter
        lengths.append((step.steady, sorted(long_tail[:, 1].tolist())))
    assert len(lengths[0][1]) > 1  # cut into chunks
    assert [steady for steady, _ in lengths] == [False, False, True, True, True, True]
    for (_, before), (steady, after) in zip(lengths[1:], lengths[2:]):  # steady: the last chunk grows by one
        assert steady and sum(after) == sum(before) + 1 and len(after) == len(before)
        assert sum(a != b for a, b in zip(before, after)) == 1  # one chunk grew, the others kept their lengths


def plan_positions(plan) -> int:
    """KV positions (entries of the plan's kv_indices) the plan's work items cover: what stage 1 reads per KV head.
    Query tiles of one node cover the same positions; a slot under two window starts is two positions."""
    num_large, num_small, _ = plan.counts.tolist()
    covered = set()
    for kv_start, kv_len, *_ in plan.items[:num_large + num_small].tolist():
        covered.update(range(kv_start, kv_start + kv_len))
    return len(covered)


def run_window(sim, sp, reqs, num_queries=None):
    """One step of a sliding-window planner: each query reads exactly its window, once; the step's unique tokens
    are the positions its plan reads, a fresh window tree's on a planned step, and never fewer on a steady one
    (which keeps its full plan's runs: ``test_steady_steps_keep_runs_a_fresh_tree_would_split``)."""
    seq_lens = sim.prepare_decode(reqs)
    rows = num_queries or len(reqs)
    step = sp.plan(reqs, seq_lens, rows)
    assert_items_read_tokens(step.plan)
    got = plan_kv_reads(step.plan)
    assert len(got) == rows and all(g == [] for g in got[len(reqs):])
    for b, (req, n) in enumerate(zip(reqs, seq_lens.tolist())):
        window = sim.req_to_token[req.req_pool_idx, max(n - sp.window, 0):n].tolist()
        assert sorted(got[b]) == sorted(window), f"query {b}, step {'steady' if step.steady else 'planned'}"
    assert step.unique_tokens == plan_positions(step.plan)
    fresh = DecodeKVTreeBuilder(sim.req_to_token).build_window(reqs, seq_lens, sp.window)
    assert step.attended_tokens == fresh.attended_tokens
    assert (step.unique_tokens >= fresh.unique_tokens if step.steady else step.unique_tokens == fresh.unique_tokens)
    sim.finish_decode(reqs)
    return step.steady


@pytest.mark.parametrize("padded", [None, 8], ids=["eager", "graph_padded"])
@pytest.mark.parametrize("window, steady", [
    (3, [False, False] + [True] * 4 + [False] + [True] * 4 + [False]),  # inside every tail: each root is a tail
    (20, [False, False] + [True] * 4 + [False] + [True] * 4 + [False]),  # inside the prompt, one start per branch
    (57, [False, False, True, False, False, False, True, True, True, True, False, True]),  # reached mid-run
    (1000, [False, False] + [True] * 4 + [False] + [True] * 4 + [False]),  # never reached: a full tree
], ids=["tails", "prompt", "reached", "whole"])
def test_window_steady_steps_read_each_querys_window(window, steady, padded):
    """A sliding-window plan's steady steps: every query's window moves one token on, its root's first item
    with it, as long as the tails have room and no query whose window still covers its whole path reaches the
    window's length (57: the fork's branches, 53-55 tokens long at the first step, reach it one after another,
    and until the last has, every step is planned in full). A window inside a tail of one item: that item loses a
    token at its start and gains one at its end."""
    sim = RadixSim(kv_slots=4096)
    sp = step_planner(sim, slack=4, window=window)
    reqs = fork(sim, 3) + sim.prefill([sim.new_req(sim.fresh(9))])  # a fork and an unrelated request
    assert [run_window(sim, sp, reqs, padded) for _ in range(12)] == steady


def test_window_steady_steps_stop_before_a_moving_chunk_runs_out(monkeypatch):
    """A window root cut into chunks shorter than the room (the planner's minimum chunk and start-up cost lowered):
    each steady step takes a token from the root's first chunk, so the room stops one token short of emptying it.
    With the default constants a chunk holds at least MIN_CHUNK_TOKENS (256) positions, more than SLACK_TOKENS
    (64), so no other test reaches this limit."""
    import sglang_deft.kernels.plan as kernel_plan

    monkeypatch.setattr(kernel_plan, "MIN_CHUNK_TOKENS", 4)
    monkeypatch.setattr(kernel_plan, "PROGRAM_LATENCY_BYTES", 1)
    sim = RadixSim(kv_slots=4096, max_context=512)
    sp = step_planner(sim, slack=40, window=60)
    reqs = sim.prefill([sim.new_req(sim.fresh(100)), sim.new_req(sim.fresh(20))])
    first = sp.plan(reqs, sim.prepare_decode(reqs), 2)  # to see the chunks the window root is cut into
    assert int(first.plan.items[:int(first.plan.counts[0] + first.plan.counts[1]), 1].min()) < 10
    sim.finish_decode(reqs)
    steady = [run_window(sim, sp, reqs) for _ in range(45)]
    assert 10 < sum(steady) < 44  # steady steps, and planned steps where a chunk would have run out


@pytest.mark.parametrize("padded", [None, 8], ids=["eager", "graph_padded"])
def test_window_steady_steps_when_most_queries_have_a_private_node(padded):
    """Branches of 3-6 tokens on a 150-token prompt, windows of 41 starting at four places of it: one run, three
    queries with a private node of earlier positions. In buffers for as many queries as the batch (or the padded
    size), tails and private nodes are more growing nodes than query rows: every one of them grows."""
    sim = RadixSim(kv_slots=4096)
    sp = step_planner(sim, slack=4, max_queries=padded or 4, window=41)
    prompt = sim.tokens(150)
    sim.run_to_cache(prompt)
    reqs = sim.prefill([sim.new_req(prompt + sim.fresh(n)) for n in (3, 4, 5, 6)])
    assert [run_window(sim, sp, reqs, padded) for _ in range(7)] == [False, False, True, True, True, True, False]
    assert sp._state is not None and sp._state.num_tails == 7


def test_branches_whose_windows_start_together_share_a_moving_root_split_into_tiles():
    """36 branches of one length forked from a 300-token prompt: their 200-token windows start at the same
    place, one root read once for all of them, which in 64-row tiles (36 x GQA 4 rows) is three items that move
    together."""
    sim = RadixSim(kv_slots=16384)
    sp = step_planner(sim, slack=4, window=200, max_queries=40)
    prompt = sim.tokens(300)
    sim.run_to_cache(prompt)
    reqs = sim.prefill([sim.new_req(prompt + sim.fresh(5)) for _ in range(36)])
    assert [run_window(sim, sp, reqs) for _ in range(6)] == [False, False, True, True, True, True]
    assert sp._state.num_moving == 1  # one root ...
    assert int(sp._start_operands[sp._start_cap:].sum()) == 3  # ... whose three tiles' items move


def test_a_window_root_cut_into_chunks_moves_its_first_chunk_only():
    """A 1,100-token window inside a 1,200-token request: the planner cuts it into chunks; steady steps move the
    first chunk's start and grow the last chunk, the others keep their ranges."""
    sim = RadixSim(kv_slots=4096, max_context=2048)
    sp = step_planner(sim, slack=4, window=1100)
    reqs = sim.prefill([sim.new_req(sim.fresh(1200)), sim.new_req(sim.fresh(30))])
    ranges = []
    for _ in range(5):
        steady = run_window(sim, sp, reqs)
        items = sp.buffers.items[:int(sp.buffers.counts[0] + sp.buffers.counts[1])].numpy()
        ranges.append((steady, sorted(map(tuple, items[items[:, 1] >= MIN_CHUNK_TOKENS][:, :2].tolist()))))
    assert [steady for steady, _ in ranges] == [False, False, True, True, True] and len(ranges[1][1]) > 2
    for (_, before), (_, after) in zip(ranges[1:], ranges[2:]):
        assert after[0] == (before[0][0] + 1, before[0][1] - 1)  # the first chunk starts one token later
        assert after[1:-1] == before[1:-1] and after[-1] == (before[-1][0], before[-1][1] + 1)


@pytest.mark.parametrize("page", [1, 4], ids=["page1", "page4"])
@pytest.mark.parametrize("window", [1, 3, 9, 40])
def test_window_steps_on_random_schedules(window, page):
    """Random forks of a few shared prompts joining (with and without the overlap scheduler's delay), decoding a
    few steps in the same batch, finishing, and evictions: every step of the window plan, steady or planned in
    full, reads each query's window exactly."""
    rng = random.Random(window * 10 + page)
    sim = RadixSim(seed=window, kv_slots=16384, max_reqs=48, page_size=page)
    sp = step_planner(sim, slack=3, max_queries=48, window=window)
    bases = [sim.tokens(rng.randint(20, 80)) for _ in range(3)]
    running, steady = [], []
    for _ in range(12):
        join_random_forks(sim, rng, bases, running, forks=2, extra=[0, 1, 5], cached=0.5, copies=[1, 2, 4])
        rows = rng.choice([None, 48])  # eager, or a CUDA graph's padded batch
        for _ in range(rng.randint(1, 6) if running else 0):
            steady.append(run_window(sim, sp, running, rows))
        retire_random(sim, rng, running, finished=0.2)
    assert sum(steady) >= 5 and not all(steady)


def test_window_steps_starting_at_a_fork_point_are_steady():
    """A window that starts where the prompt ends leaves no empty root behind (which made the steady step a full one)."""
    sim = RadixSim(kv_slots=4096)
    sp = step_planner(sim, slack=4, window=3)
    prompt = sim.fresh(10)
    sim.run_to_cache(prompt)
    reqs = sim.prefill([sim.new_req(prompt + sim.fresh(1)) for _ in range(2)])  # 12, then 13: cut 10 on step 2
    assert [run_window(sim, sp, reqs) for _ in range(4)] == [False, False, True, True]


def test_a_step_the_buffers_refused_keeps_no_steady_state():
    """plan() returning None has written the refused tree's KV slots into the buffers: the same step asked for again
    (at a row count that fits) must be planned in full, not advanced from the last plan."""
    sim = RadixSim(kv_slots=4096)
    sp = step_planner(sim, slack=8)
    reqs = fork(sim, 3)
    assert [run(sim, sp, reqs) for _ in range(3)] == [False, False, True]
    seq_lens = sim.prepare_decode(reqs)
    assert sp.plan(reqs, seq_lens, 17) is None  # more rows than the buffers hold
    assert sp._state is None
    # and the buffers say they hold no step, so that a launch from them (a captured graph's) is refused
    assert sp.buffers.buffers.num_queries is None and sp.buffers.buffers.max_kv_slot is None
    step = sp.plan(reqs, seq_lens, 3)
    check(sim, reqs, seq_lens, step, 3)
    assert not step.steady


def test_a_batch_filling_the_buffers_takes_steady_steps():
    """As many requests as the buffers have query rows: one growing node per row, and every one fits the update."""
    sim = RadixSim(kv_slots=4096)
    sp = step_planner(sim, slack=4, max_queries=3)
    reqs = fork(sim, 3)
    assert [run(sim, sp, reqs) for _ in range(4)] == [False, False, True, True]


def test_a_step_where_not_every_request_is_one_token_on_is_planned_in_full():
    """Steady steps grow every tail by one: the batch's lengths must each be one more than the plan's, not only some."""
    sim = RadixSim(kv_slots=4096)
    sp = step_planner(sim, slack=8)
    reqs = fork(sim, 2)
    assert [run(sim, sp, reqs) for _ in range(2)] == [False, False]  # the second lays out room
    seq_lens = sim.prepare_decode(reqs).clone()
    seq_lens[1] -= 1  # request 1 is where the plan left it, request 0 one token on
    step = sp.plan(reqs, seq_lens, 2)
    check(sim, reqs, seq_lens, step, 2)
    assert not step.steady


def test_the_next_steps_of_a_batch_past_the_buffers_are_refused_without_a_build():
    """A tree past the buffers' KV capacity (or the plan limits) stays past them as its tails grow: its next steps are
    refused without building and scheduling it again (the backend then builds and plans it in buffers of its own, so
    a build here would be the step's second), until ``slack`` steps on it is tried again; another batch is tried at
    once."""
    sim = RadixSim(kv_slots=4096)
    sp = step_planner(sim, slack=2, kv_capacity=64)
    built = []
    build = sp.builder.build
    sp.builder.build = lambda *a, **k: built.append(1) or build(*a, **k)
    reqs = fork(sim, 3, prompt_len=60)  # 60 shared + 3 tails: past 64 KV entries
    outcomes = []
    for _ in range(7):
        seq_lens = sim.prepare_decode(reqs)
        before = len(built)
        outcomes.append((sp.plan(reqs, seq_lens, len(reqs)), len(built) - before))
        sp.builder.build(reqs, seq_lens)  # the backend's plan of its own, with the same builder
        sim.finish_decode(reqs)
    assert outcomes == [(None, 1), (None, 0), (None, 0), (None, 1), (None, 0), (None, 0), (None, 1)]
    other = sim.prefill([sim.new_req(sim.fresh(5))])  # a batch that fits, right after a refused one
    step = sp.plan(other, sim.prepare_decode(other), 1)
    assert step is not None and not step.steady


def test_a_batch_refused_for_its_rows_only_is_tried_at_its_next_step():
    """More rows than the buffers hold (a graph's padded size past them) says nothing about the tree: the same batch's
    next step at a row count that fits is planned."""
    sim = RadixSim(kv_slots=4096)
    sp = step_planner(sim, slack=8)
    reqs = fork(sim, 3)
    seq_lens = sim.prepare_decode(reqs)
    assert sp.plan(reqs, seq_lens, 17) is None
    sp.builder.build(reqs, seq_lens)
    sim.finish_decode(reqs)
    seq_lens = sim.prepare_decode(reqs)
    step = sp.plan(reqs, seq_lens, 3)
    check(sim, reqs, seq_lens, step, 3)
