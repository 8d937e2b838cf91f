"""The decode-sharing log line: windows of ``--decode-log-interval`` steps (or up to a pause in decoding), running
totals, parsed back."""
from __future__ import annotations

import logging
import time

import pytest

from sglang_deft.sharing_metrics import LOG_PREFIX, SharingMeter, parse_sharing_lines


def test_each_window_restarts_and_the_totals_run_on(caplog):
    meter = SharingMeter(interval=2)
    steps = [(100, 10, 1e-4, False), (50, 10, 3e-4, True),  # window 1
             (30, 30, 5e-4, True), (20, 10, 7e-4, False)]  # window 2
    with caplog.at_level(logging.INFO, logger="sglang_deft.sharing_metrics"):
        meter.record(*steps[0])
        assert parse_sharing_lines(caplog.text) == []  # nothing before the window is full
        for step in steps[1:]:
            meter.record(*step)
    assert parse_sharing_lines(caplog.text) == [
        pytest.approx(dict(steps=2, attended_kv_tokens=150, unique_kv_tokens=20, ratio=7.5, plan_host_us=200.0,
                           steady_steps=1, total_steps=2, total_attended_kv_tokens=150, total_unique_kv_tokens=20)),
        pytest.approx(dict(steps=2, attended_kv_tokens=50, unique_kv_tokens=40, ratio=1.25, plan_host_us=600.0,
                           steady_steps=1, total_steps=4, total_attended_kv_tokens=200, total_unique_kv_tokens=60)),
    ]


def test_an_empty_window_reads_as_no_sharing():
    (row,) = parse_sharing_lines(SharingMeter(interval=8).format_line())
    assert (row["steps"], row["ratio"], row["plan_host_us"]) == (0, 1.0, 0.0) and "window_ratio" not in row
    (row,) = parse_sharing_lines(SharingMeter(interval=8, window_share=0.5).format_line())  # a windowed model's
    assert (row["ratio"], row["window_ratio"]) == (1.0, 1.0)


def test_parse_reads_bare_and_decorated_lines_only():
    line = SharingMeter(interval=1, steps=1, attended=9, unique=3, total_steps=1, total_attended=9,
                        total_unique=3).format_line()
    assert line.startswith(LOG_PREFIX)
    rows = parse_sharing_lines(f"{line}\nDecode batch, #running-req: 3, #token: 9\n[2026-01-01 00:00:00] {line}")
    assert [(r["attended_kv_tokens"], r["unique_kv_tokens"], r["ratio"]) for r in rows] == [(9, 3, 3.0)] * 2


def test_a_line_cut_short_is_left_out_and_dp_ranks_are_read():
    """A log read while the server writes it may end inside a line; with --dp-size every DP rank's scheduler
    logs its own totals, under SGLang's ``DPn`` prefix."""
    line = SharingMeter(interval=1, steps=1, attended=9, unique=3, total_steps=1, total_attended=9,
                        total_unique=3).format_line()
    cut = line[:line.index("total_unique_kv_tokens")]
    assert parse_sharing_lines(f"{line}\n{cut}") == parse_sharing_lines(line)
    rows = parse_sharing_lines(f"[2026-01-01 00:00:00 DP1 TP0] {line}\n[2026-01-01 00:00:00] {line}\n"
                               f"[2026-01-01 00:00:00 DP12 TP0] {line}")
    assert rows[0]["dp_rank"] == 1 and "dp_rank" not in rows[1] and rows[2]["dp_rank"] == 12


def test_a_windowed_models_counts_are_per_layer_over_its_layers(caplog):
    """Sliding-window layers (here 3 in 4: window_share 0.75) count their windows' tokens: the line's counts are
    the per-layer average over the model's layers, window_ratio the window layers' own."""
    meter = SharingMeter(interval=2, window_share=0.75)
    with caplog.at_level(logging.INFO, logger="sglang_deft.sharing_metrics"):
        meter.record(100, 20, window=(40, 10))
        meter.record(100, 20, window=(40, 30))
    (row,) = parse_sharing_lines(caplog.text)
    # attended 0.25 * 200 + 0.75 * 80 = 110, unique 0.25 * 40 + 0.75 * 40 = 40
    assert row == pytest.approx(dict(steps=2, attended_kv_tokens=110, unique_kv_tokens=40, ratio=2.75, window_ratio=2.0,
                                     plan_host_us=0.0, steady_steps=0, total_steps=2, total_attended_kv_tokens=110,
                                     total_unique_kv_tokens=40))


def test_a_windowed_models_lines_each_count_their_own_window(caplog):
    """Every line's window counts are its own steps': the window tokens restart with the line (they piled up, and a
    Gemma-like model's per-layer counts grew without end) and window_ratio is the line's (not the run's)."""
    meter = SharingMeter(interval=1, window_share=0.5)
    with caplog.at_level(logging.INFO, logger="sglang_deft.sharing_metrics"):
        meter.record(10, 10, window=(8, 2))
        meter.record(10, 10, window=(4, 4))
    second = parse_sharing_lines(caplog.text)[1]
    assert (second["window_ratio"], second["attended_kv_tokens"], second["unique_kv_tokens"]) == (1.0, 7, 7)
    assert (second["total_attended_kv_tokens"], second["total_unique_kv_tokens"]) == (16, 13)


def test_window_counts_go_with_window_layers_only():
    with pytest.raises(ValueError, match="window counts None for a model whose window layers are 0.500"):
        SharingMeter(interval=2, window_share=0.5).record(10, 5)
    with pytest.raises(ValueError, match=r"window counts \(4, 2\) for a model whose window layers are 0.000"):
        SharingMeter(interval=2).record(10, 5, window=(4, 2))
    assert "window_ratio" not in SharingMeter(interval=2).format_line()


def _lines_once_logged(caplog, count: int, timeout_s: float = 20.0) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while len(rows := parse_sharing_lines(caplog.text)) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return rows


def test_a_pause_logs_the_steps_the_interval_has_not(caplog):
    """A run shorter than --decode-log-interval logged no line at all, and a run's last steps none either."""
    meter = SharingMeter(interval=40, idle_s=0.3)
    with caplog.at_level(logging.INFO, logger="sglang_deft.sharing_metrics"):
        for step in [(100, 10), (100, 10), (40, 40)]:
            meter.record(*step)
        assert parse_sharing_lines(caplog.text) == []  # not before the pause
        (row,) = _lines_once_logged(caplog, 1)
        assert (row["steps"], row["attended_kv_tokens"], row["unique_kv_tokens"], row["total_steps"]) == (3, 240, 60, 3)
        meter.record(30, 10)  # decoding again: a new watcher for the next pause
        meter.record(30, 10)
        rows = _lines_once_logged(caplog, 2)
        assert [(r["steps"], r["total_steps"], r["total_attended_kv_tokens"]) for r in rows] == [(3, 3, 240),
                                                                                                (2, 5, 300)]
        deadline = time.monotonic() + 20
        while meter._watching and time.monotonic() < deadline:  # the watcher ends once nothing is pending
            time.sleep(0.02)
        assert not meter._watching


def test_a_window_the_interval_logged_is_not_logged_again(caplog):
    meter = SharingMeter(interval=2, idle_s=0.05)
    with caplog.at_level(logging.INFO, logger="sglang_deft.sharing_metrics"):
        meter.record(10, 5)
        meter.record(10, 5)
        time.sleep(0.3)
    assert [r["steps"] for r in parse_sharing_lines(caplog.text)] == [2]


def test_the_watcher_waits_for_the_whole_pause(caplog):
    meter = SharingMeter(interval=40, idle_s=60)  # its thread sleeps past the test; the steps are logged here
    with caplog.at_level(logging.INFO, logger="sglang_deft.sharing_metrics"):
        meter.record(10, 5)
        now = time.monotonic()
        assert 50 < meter.log_if_idle(now + 5) <= 55  # 5 s into a 60 s pause: nothing yet, 55 s to wait
        assert parse_sharing_lines(caplog.text) == []
        assert meter.log_if_idle(now + 60) is None
        (row,) = parse_sharing_lines(caplog.text)
        assert row["steps"] == 1 and not meter._watching


@pytest.mark.parametrize("idle_s, log", [(None, True), (0.01, False)])
def test_no_pause_line_without_a_pause_or_on_a_rank_that_does_not_log(caplog, idle_s, log):
    meter = SharingMeter(interval=40, idle_s=idle_s, log=log)
    with caplog.at_level(logging.INFO, logger="sglang_deft.sharing_metrics"):
        meter.record(10, 5)
        time.sleep(0.2)
    assert parse_sharing_lines(caplog.text) == [] and not meter._watching and meter.steps == 1
