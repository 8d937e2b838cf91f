"""schedule.c's own contracts: numpy's float summation, malformed trees, growing buffers, and how the
C library is built (tests/test_plan_reference.py holds its plans to the specification)."""
from __future__ import annotations

import ctypes
import os
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from kernel_trees import make_tree, named_trees, random_forest
from sglang_deft.kernels import KVTree, PlanCapacity, plan_tree_decode
from sglang_deft.kernels import c_library
from sglang_deft.kernels.plan import TreeDecodePlanner, build_schedule
from sglang_deft.kernels.schedule import Schedule
from test_plan_reference import arrays, build_schedule_reference


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 127, 128, 129, 300, 1000, 8191, 8193, 20000])
def test_pairwise_sum_is_numpys_sum(n):
    # The chunk target is a float sum over the tiles' costs; a sum in another order rounds differently
    # (sequential addition differs from numpy's in most of these), and a chunk count may follow.
    fn = c_library.load("schedule.c").deft_pairwise_sum
    fn.restype, fn.argtypes = ctypes.c_double, [ctypes.c_void_p, ctypes.c_int64]
    rng = np.random.default_rng(n)
    for scale in (1.0, 675.84, 1e7):
        a = rng.random(n) * scale
        assert fn(a.ctypes.data, n) == float(a.sum())


def tree_of(indptr, parent, qnode):
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    return KVTree(torch.arange(max(indptr[-1], 0), dtype=torch.int32), i32(indptr), i32(parent), i32(qnode))


@pytest.mark.parametrize("indptr,parent,qnode,match", [
    ([0, 5, 3], [-1, 0], [1], "node_indptr"),
    ([-2, 5, 8], [-1, 0], [1], "node_indptr"),
    ([0, 5], [-1, 0], [0], "entries for 2 nodes"),
    ([0, 5, 8], [-1, 1], [1], "node_parent"),
    ([0, 5, 8], [1, -1], [1], "node_parent"),
    ([0, 5, 8], [-1, -3], [1], "node_parent"),
    ([0, 5, 8], [-1, 0], [2], "query_node"),
    ([0, 5, 8], [-1, 0], [-1], "query_node"),
    ([0], [], [0], "query_node"),
])
def test_malformed_trees_raise_before_anything_is_planned(indptr, parent, qnode, match):
    with pytest.raises(ValueError, match=match):
        plan_tree_decode(tree_of(indptr, parent, qnode), 8, 2, 32, "cpu")


def test_capacity_errors_name_what_overflows():
    tree = make_tree([-1] + [0] * 6, [600] + [3] * 6, list(range(1, 7)))
    cap = PlanCapacity(max_queries=4, max_kv_tokens=10000, max_items=100, max_partials=100, max_merge=100)
    with pytest.raises(ValueError, match="needs 6 queries, more than the plan capacity 4"):
        plan_tree_decode(tree, 8, 2, 32, "cpu", capacity=cap)
    with pytest.raises(ValueError, match="work items, more than the plan capacity 3"):
        plan_tree_decode(tree, 8, 2, 32, "cpu", capacity=dataclasses.replace(cap, max_queries=8, max_items=3))


def test_a_planner_grows_its_buffer_and_plans_as_fresh():
    """Small, big (past the host buffer a planner starts with), small again."""
    planner = TreeDecodePlanner(32, 8, 128, schedule=Schedule())
    start = len(planner._schedule.out)
    trees = [random_forest(num_nodes=10, num_queries=5, max_len=50, seed=1),
             make_tree([-1] + [0] * 2000, [5000] + [300] * 2000, list(range(1, 2001)), pool=700000),
             random_forest(num_nodes=30, num_queries=20, max_len=500, seed=2)]
    for tree in trees:
        got = planner.plan(tree, "cpu")
        want = build_schedule(*(t.numpy() for t in (tree.node_indptr, tree.node_parent, tree.query_node)),
                              group_size=4, head_dim=128, kv_elem_bytes=2, num_kv_heads=8, num_sms=8)
        num_large, num_small, B = got.counts.tolist()
        assert torch.equal(got.items[:num_large + num_small], torch.from_numpy(want[1]).to(torch.int32))
        assert torch.equal(got.merge_slots, torch.from_numpy(want[4]).to(torch.int32))
    assert len(planner._schedule.out) > start


def test_no_compiler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SGLANG_DEFT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(c_library, "_LOADED", {})
    with pytest.raises(c_library.CLibraryError, match="found no C compiler"):
        c_library.load("schedule.c")
    # A planner (the backend makes one when the server starts) fails at construction, not mid-serving.
    with pytest.raises(c_library.CLibraryError, match="found no C compiler"):
        TreeDecodePlanner(32, 8, 128)


def test_without_a_compiler_a_build_cached_earlier_is_loaded(tmp_path, monkeypatch):
    """A compiler built the library once (an image's first start); without one (removed afterwards, or another
    user's process with no compiler on PATH), that build is loaded instead of refusing to plan. Before, the
    cache file's name hashed the compiler, so nothing could be found without one."""
    monkeypatch.setenv("SGLANG_DEFT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(c_library, "_LOADED", {})
    monkeypatch.setattr(c_library, "HERE", tmp_path)
    (tmp_path / "one.c").write_text("int one(void) { return 1; }\n")
    assert c_library.load("one.c").one() == 1
    built = list((tmp_path / "cache").iterdir())
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(c_library, "_LOADED", {})
    assert c_library.load("one.c").one() == 1
    assert list((tmp_path / "cache").iterdir()) == built
    # Another source (a new sglang-deft version) finds no build of its own: the error says so.
    monkeypatch.setattr(c_library, "_LOADED", {})
    (tmp_path / "one.c").write_text("int one(void) { return 2 - 1; }\n")
    with pytest.raises(c_library.CLibraryError, match="found no C compiler.*No build of one.c is cached either"):
        c_library.load("one.c")


def test_a_compiler_that_fails_falls_back_to_a_build_cached_earlier(tmp_path, monkeypatch):
    """A compiler that is there but cannot build (no libc headers, a $CC naming a missing program) is no worse than
    none: a build cached earlier is loaded, the newest that loads. Before, only a machine without any compiler
    looked in the cache, and it gave up at a newest file cut short."""
    monkeypatch.setenv("SGLANG_DEFT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(c_library, "_LOADED", {})
    monkeypatch.setattr(c_library, "HERE", tmp_path)
    (tmp_path / "one.c").write_text("int one(void) { return 1; }\n")
    assert c_library.load("one.c").one() == 1
    (built,) = (tmp_path / "cache").iterdir()
    # A newer build from another compiler, cut short: skipped for the older one that loads.
    cut_short = built.with_name(built.name.replace(built.name.split("_")[-1], "deadbeef" + c_library._suffix()))
    cut_short.write_bytes(b"")
    os.utime(cut_short, ns=(built.stat().st_mtime_ns + 10**9,) * 2)
    for cc in ("false", str(tmp_path / "no-such-cc")):
        monkeypatch.setenv("CC", cc)
        monkeypatch.setattr(c_library, "_LOADED", {})
        assert c_library.load("one.c").one() == 1
    built.unlink()
    monkeypatch.setattr(c_library, "_LOADED", {})
    with pytest.raises(c_library.CLibraryError, match="(?s)building one.c failed.*cached earlier do not load either"):
        c_library.load("one.c")


def test_a_failed_build_says_why_and_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SGLANG_DEFT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(c_library, "_LOADED", {})
    monkeypatch.setattr(c_library, "HERE", tmp_path)
    (tmp_path / "broken.c").write_text("int f( {")
    with pytest.raises(c_library.CLibraryError, match="building broken.c failed"):
        c_library.load("broken.c")
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_compiler_that_does_not_run_is_a_build_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SGLANG_DEFT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(c_library, "_LOADED", {})
    with pytest.raises(c_library.CLibraryError, match="building schedule.c failed"):
        c_library.load("schedule.c")
    assert list(tmp_path.iterdir()) == []  # its temporary file is gone too


def test_the_library_is_built_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SGLANG_DEFT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(c_library, "_LOADED", {})
    lib = c_library.load("schedule.c")
    assert c_library.load("schedule.c") is lib
    built = list(tmp_path.iterdir())
    assert len(built) == 1 and built[0].name.startswith("schedule_")
    monkeypatch.setattr(c_library, "_LOADED", {})
    mtime = built[0].stat().st_mtime_ns
    c_library.load("schedule.c")  # a new process: loads the cached file, builds nothing
    assert list(tmp_path.iterdir()) == built and built[0].stat().st_mtime_ns == mtime
    # Readable by everyone, as a library the linker writes itself: other users sharing the cache load it
    # (mkstemp's 0600 plus the linker's execute bits made it 0711).
    assert built[0].stat().st_mode & 0o777 == 0o755


def test_a_library_that_does_not_load_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SGLANG_DEFT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(c_library, "_LOADED", {})

    def refuse(path):
        raise OSError(f"{path}: cannot open shared object file: Permission denied")

    monkeypatch.setattr(c_library.ctypes, "CDLL", refuse)
    with pytest.raises(c_library.CLibraryError, match="cannot load .*Permission denied.*built again just now"):
        c_library.load("schedule.c")


def test_a_cached_library_cut_short_is_built_again(tmp_path, monkeypatch):
    """A crash before the rename's data reached the disk can leave the cached file empty: every later process
    would fail to load it until someone deleted it by hand."""
    monkeypatch.setenv("SGLANG_DEFT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(c_library, "_LOADED", {})
    # Built, not loaded: dlopen would hand this process the library it already has at that path.
    built = c_library._build(c_library.HERE / "schedule.c", c_library._compiler())
    built.write_bytes(b"")
    assert list(tmp_path.iterdir()) == [built]
    assert c_library.load("schedule.c").deft_schedule is not None
    assert list(tmp_path.iterdir()) == [built] and built.stat().st_size > 0


def test_a_failed_link_reports_the_linkers_error(tmp_path, monkeypatch):
    """The linker removes its output when it fails: cleaning up must not hide its message behind a missing file."""
    monkeypatch.setenv("SGLANG_DEFT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", f"{_system_cc()} -lsglang_deft_no_such_library")
    monkeypatch.setattr(c_library, "_LOADED", {})
    with pytest.raises(c_library.CLibraryError, match="(?s)building schedule.c failed.*sglang_deft_no_such_library"):
        c_library.load("schedule.c")
    assert list(tmp_path.iterdir()) == []


def test_a_temp_dir_others_can_write_is_not_used(tmp_path, monkeypatch):
    """The fallback's name is predictable: a directory another user made (or can write) could hold a library
    this process would run."""
    import os
    import tempfile

    blocked = tmp_path / "not-a-dir"
    blocked.write_text("")
    monkeypatch.setenv("SGLANG_DEFT_CACHE_DIR", str(blocked / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    shared = tmp_path / f"sglang_deft_{os.getuid()}"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setattr(c_library, "_LOADED", {})
    with pytest.raises(c_library.CLibraryError, match="no writable cache directory"):
        c_library.load("schedule.c")
    assert list(shared.iterdir()) == []


def test_a_temp_dir_name_that_is_a_symlink_is_not_used(tmp_path, monkeypatch):
    """A link passes as its target: another user could point the predictable name at a private directory of
    ours, then at one of theirs between the check and the build or load."""
    import os
    import tempfile

    blocked = tmp_path / "not-a-dir"
    blocked.write_text("")
    monkeypatch.setenv("SGLANG_DEFT_CACHE_DIR", str(blocked / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ours = tmp_path / "ours"
    ours.mkdir(mode=0o700)
    (tmp_path / f"sglang_deft_{os.getuid()}").symlink_to(ours)
    monkeypatch.setattr(c_library, "_LOADED", {})
    with pytest.raises(c_library.CLibraryError, match="no writable cache directory"):
        c_library.load("schedule.c")
    assert list(ours.iterdir()) == []


VALUE_SOURCE = "#ifndef VALUE\n#define VALUE 1\n#endif\nint deft_value(void) { return VALUE; }\n"


def _system_cc() -> str:
    import shutil

    return shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _wrapper_cc(path, define: str):
    """A compiler that is the system's with one more -D: a library it builds answers differently."""
    path.write_text(f'#!/bin/sh\nexec {_system_cc()} {define} "$@"\n')
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("change", ["source", "flags", "compiler_path", "compiler_replaced_in_place",
                                    "compiler_arguments", "machine"])
def test_whatever_changes_the_build_builds_the_library_anew(tmp_path, monkeypatch, change):
    """The cache key covers the source, the flags, the compiler (its path, its arguments in $CC, its mtime) and
    the machine (a cache shared by x86_64 and aarch64 hosts): a later process after any of them changed must
    load a library built anew, never the stale one."""
    import os

    cache = tmp_path / "cache"
    monkeypatch.setenv("SGLANG_DEFT_CACHE_DIR", str(cache))
    monkeypatch.setattr(c_library, "HERE", tmp_path)
    source = tmp_path / "value.c"
    source.write_text(VALUE_SOURCE)
    cc = _wrapper_cc(tmp_path / "cc1", "-DUNUSED=1")
    monkeypatch.setenv("CC", str(cc))

    def value() -> int:
        monkeypatch.setattr(c_library, "_LOADED", {})  # a new process
        return c_library.load("value.c").deft_value()

    assert value() == 1 and len(list(cache.iterdir())) == 1
    if change == "source":
        source.write_text(VALUE_SOURCE.replace("define VALUE 1", "define VALUE 2"))
    elif change == "flags":
        monkeypatch.setattr(c_library, "CFLAGS", [*c_library.CFLAGS, "-DVALUE=2"])
    elif change == "compiler_path":  # another compiler, even one of the same mtime
        other = _wrapper_cc(tmp_path / "cc2", "-DVALUE=2")
        os.utime(other, ns=(cc.stat().st_atime_ns, cc.stat().st_mtime_ns))
        monkeypatch.setenv("CC", str(other))
    elif change == "compiler_arguments":  # $CC with arguments, as "ccache gcc"
        monkeypatch.setenv("CC", f"{cc} -DVALUE=2")
    elif change == "machine":  # the same compiler path and mtime on another architecture
        monkeypatch.setattr(c_library.platform, "machine", lambda: "aarch64-elsewhere")
        cache_before = set(cache.iterdir())
        monkeypatch.setattr(c_library, "_LOADED", {})
        c_library.load("value.c")
        assert len(set(cache.iterdir()) - cache_before) == 1  # its own file, not the x86_64 one
        return
    else:  # an upgraded compiler at the same path
        mtime = cc.stat().st_mtime_ns
        _wrapper_cc(cc, "-DVALUE=2")
        os.utime(cc, ns=(mtime + 10**9, mtime + 10**9))
    assert value() == 2
    assert len(list(cache.iterdir())) == 2


@pytest.mark.parametrize("env, expected", [
    (dict(SGLANG_DEFT_CACHE_DIR="/a/deft", XDG_CACHE_HOME="/b", HOME="/c"), "/a/deft"),
    (dict(XDG_CACHE_HOME="/b", HOME="/c"), "/b/sglang_deft"),
    (dict(HOME="/c"), "/c/.cache/sglang_deft"),
])
def test_cache_dir_is_the_documented_one(monkeypatch, env, expected):
    from pathlib import Path

    for name in ("SGLANG_DEFT_CACHE_DIR", "XDG_CACHE_HOME", "HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert c_library._cache_dir() == Path(expected)


def test_an_unwritable_cache_dir_falls_back_to_the_temp_dir(tmp_path, monkeypatch):
    import os
    import tempfile

    blocked = tmp_path / "not-a-dir"
    blocked.write_text("")  # the cache directory cannot be made: a file is in its place
    monkeypatch.setenv("SGLANG_DEFT_CACHE_DIR", str(blocked / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(c_library, "_LOADED", {})
    lib = c_library.load("schedule.c")
    assert lib.deft_schedule is not None
    (built,) = (tmp_path / "tmp" / f"sglang_deft_{os.getuid()}").iterdir()
    assert built.name.startswith("schedule_")
    # With the temp dir blocked too, the error names the variable to set.
    monkeypatch.setattr(tempfile, "tempdir", str(blocked))
    monkeypatch.setattr(c_library, "_LOADED", {})
    with pytest.raises(c_library.CLibraryError, match="no writable cache directory.*SGLANG_DEFT_CACHE_DIR"):
        c_library.load("schedule.c")


def test_a_cache_dir_that_refuses_the_rename_falls_back_to_the_temp_dir(tmp_path, monkeypatch):
    """The build's chmod and rename sat outside the fallback: their OSError reached the caller raw, past the next
    cache place, and left the .building- file behind."""
    import os
    import tempfile

    cache = tmp_path / "cache"
    monkeypatch.setenv("SGLANG_DEFT_CACHE_DIR", str(cache))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(c_library, "_LOADED", {})
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).parent == cache:
            raise OSError(18, "Invalid cross-device link")
        real_replace(src, dst)

    monkeypatch.setattr(c_library.os, "replace", replace)
    assert c_library.load("schedule.c").deft_schedule is not None
    assert list(cache.iterdir()) == []  # its temporary file is gone
    (built,) = (tmp_path / "tmp" / f"sglang_deft_{os.getuid()}").iterdir()
    assert built.name.startswith("schedule_")


@pytest.mark.parametrize("cap_queries, cap_items", [(5, 9), (8, 16), (13, 30), (None, None)])
def test_packed_layout_is_tight_and_queries_past_the_step_merge_nothing(cap_queries, cap_items):
    """Each field starts at the previous one's end rounded up to 16 bytes (4 int32), no further; the
    merge_indptr entries of queries past the step's B (a fixed capacity's unused rows) all equal the
    partial count, so that every such row's merge list is empty."""
    from sglang_deft.kernels.plan import ITEM_FIELDS, _plan_schedule

    tree = make_tree([-1, 0, 0, -1], [300, 5, 7, 40], [1, 2, 2, 3])
    sched = Schedule()
    s = _plan_schedule(sched, tree, group_size=4, head_dim=32, kv_elem_bytes=2, num_kv_heads=2, num_sms=8,
                       large_rows=64, programs_per_sm=4, cap_queries=cap_queries, cap_items=cap_items, kv_tokens=None)
    B = tree.num_queries
    cap_b, cap_i = cap_queries or B, cap_items or s.items
    up = lambda n: -(-n // 4) * 4  # noqa: E731
    assert (s.o_items, s.o_counts, s.o_indptr, s.o_slots) == (
        up(cap_b), up(up(cap_b) + cap_i * ITEM_FIELDS), up(up(up(cap_b) + cap_i * ITEM_FIELDS) + 3),
        up(up(up(up(cap_b) + cap_i * ITEM_FIELDS) + 3) + cap_b + 1))
    assert s.packed_len == s.o_slots + s.partials
    indptr = sched.out[s.o_indptr:s.o_indptr + cap_b + 1]
    assert indptr[0] == 0 and (np.diff(indptr[:B + 1]) > 0).all()
    assert (indptr[B:] == s.partials).all()


@pytest.mark.parametrize("capacity", [None, PlanCapacity(max_queries=300, max_kv_tokens=1 << 20, max_items=400,
                                                         max_partials=4096, max_merge=4096)], ids=["exact", "capacity"])
@pytest.mark.parametrize("name", ["fanout_256", "odd_lengths", "inner_queries", "forest", "empty_paths"])
def test_every_packed_field_is_where_the_plan_reads_it(name, capacity):
    """The plan's device fields are views of the packed buffer at schedule.c's offsets: each must hold
    the specification's values, counts included (large items, small items, queries), which
    build_schedule does not read back from the buffer (it takes them from info[])."""
    tree = named_trees()[name]
    plan = plan_tree_decode(tree, 8, 2, 32, "cpu", kv_dtype=torch.float16, capacity=capacity)
    qperm, items, num_large, indptr, slots, partials = build_schedule_reference(
        *arrays(tree), group_size=4, head_dim=32, kv_elem_bytes=2, num_kv_heads=2, num_sms=8)
    B, n = tree.num_queries, len(items)
    assert plan.counts.tolist() == [num_large, n - num_large, B]
    assert plan.qperm[:B].tolist() == qperm.tolist()
    assert plan.items[:n].tolist() == items.tolist()
    assert plan.merge_indptr[:B + 1].tolist() == indptr.tolist()
    assert (plan.merge_indptr[B:] == partials).all()  # a capacity's rows past B merge nothing
    assert plan.merge_slots[:partials].tolist() == slots.tolist()
    assert plan.merge_slots.numel() == (capacity.max_merge if capacity else partials)


@pytest.mark.parametrize("root_len", [40, 300, 40000], ids=["one_radix_pass", "two_passes", "three_passes"])
def test_items_of_equal_cost_keep_kv_then_query_order(root_len):
    """The documented order: large items before small, longer before shorter, and among items of one
    length (equal cost) kv_start, then q_start: a chunk's query tiles stay adjacent. The sort is a
    stable byte-wise radix sort whose pass count follows the KV size, so ties are checked at 1-3 passes."""
    # A root shared by 12 queries at GQA 4 (three query tiles of 16 rows) and their 12 private tails of
    # two lengths, interleaved so that equal lengths are not adjacent in KV order. The KV size (70,
    # 330, 40030 tokens) sets the sort keys' bytes.
    tree = make_tree([-1] + [0] * 12, [root_len] + [2 + i % 2 for i in range(12)], list(range(1, 13)),
                     pool=2 * root_len + 400)
    kw = dict(group_size=4, head_dim=128, kv_elem_bytes=2, num_kv_heads=8, num_sms=132, large_rows=16)
    qperm, items, num_large, *_ = build_schedule(*arrays(tree), **kw)
    is_small = np.arange(len(items)) >= num_large
    documented = sorted(range(len(items)), key=lambda i: (is_small[i], -items[i, 1], items[i, 0], items[i, 2]))
    assert documented == list(range(len(items)))
    assert num_large >= 3 and len(items) - num_large == 12 and (items[num_large:, 1] <= 3).all()
    np.testing.assert_array_equal(items, build_schedule_reference(*arrays(tree), **kw)[1])


def test_the_schedule_itself_refuses_more_queries_than_its_layout_holds():
    """schedule.c lays qperm out for cap_queries entries, the items right after: more queries would
    overwrite them. plan.py checks the capacity again, but Schedule.run must not return such a layout."""
    from sglang_deft.kernels.plan import _plan_schedule

    tree = make_tree([-1, 0, 0], [300, 5, 7], [1, 2, 2])
    with pytest.raises(ValueError, match="needs 3 queries, more than the plan capacity 2"):
        _plan_schedule(Schedule(), tree, group_size=4, head_dim=32, kv_elem_bytes=2, num_kv_heads=2, num_sms=8,
                       large_rows=64, programs_per_sm=4, cap_queries=2, cap_items=16, kv_tokens=None)


@pytest.mark.parametrize("constant, value", [("MIN_CHUNK_TOKENS", 0), ("SMALL_ROWS", -16), ("FLOP_PER_BYTE", 0.0),
                                             ("FLOP_PER_BYTE", float("nan")), ("PROGRAM_LATENCY_BYTES", -1)])
def test_a_planner_constant_set_out_of_range_is_a_clear_error(monkeypatch, constant, value):
    """Experiments change the planner's module constants; a zero chunk length divided by zero in C (SIGFPE:
    the process died)."""
    from sglang_deft.kernels import plan

    monkeypatch.setattr(plan, constant, value)
    tree = make_tree([-1, 0, 0], [300, 5, 7], [1, 2])
    with pytest.raises(ValueError, match="must be in range: MIN_CHUNK_TOKENS"):
        plan.plan_tree_decode(tree, 32, 8, 128)


def test_build_schedule_refuses_ids_past_int32():
    """build_schedule (tests' and experiments' entry) cast with np.asarray(a, np.int32): a query node 2**32 + 1 wrapped
    to node 1 and was planned as that, where the planner itself refuses int64 metadata."""
    with pytest.raises(ValueError, match="query_node holds values past int32's range"):
        build_schedule(np.array([0, 5, 8]), np.array([-1, 0]), np.array([2**32 + 1]), group_size=4, head_dim=128,
                       kv_elem_bytes=2, num_kv_heads=8, num_sms=8)


def test_build_schedule_refuses_ids_below_int32_and_keeps_int32_max():
    kw = dict(group_size=4, head_dim=128, kv_elem_bytes=2, num_kv_heads=8, num_sms=8)
    with pytest.raises(ValueError, match="node_parent holds values past int32's range"):
        build_schedule(np.array([0, 5, 8]), np.array([-1, -2**32]), np.array([1]), **kw)  # wrapped to parent 0
    with pytest.raises(ValueError, match="query_node must index a node"):  # int32's largest value is int32
        build_schedule(np.array([0, 5, 8]), np.array([-1, 0]), np.array([2**31 - 1]), **kw)


@pytest.mark.parametrize("status, error, match", [(-6, MemoryError, "could not allocate its host scratch memory"),
                                                  (-99, RuntimeError, "unknown status -99")])
def test_a_status_other_than_a_tree_error_raises_its_own_error(status, error, match):
    from sglang_deft.kernels.plan import _plan_schedule

    schedule = Schedule()
    schedule._fn = lambda *args: status
    with pytest.raises(error, match=match):
        _plan_schedule(schedule, make_tree([-1, 0, 0], [300, 5, 7], [1, 2]), group_size=4, head_dim=32,
                       kv_elem_bytes=2, num_kv_heads=2, num_sms=8, large_rows=64, programs_per_sm=4,
                       cap_queries=None, cap_items=None, kv_tokens=None)
