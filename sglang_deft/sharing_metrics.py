"""How much KV the decode steps read once for several requests: counted per step, logged per interval.

Every ``interval`` decode steps (``--decode-log-interval``, SGLang's decode-stats interval) the
backend logs one line in the scheduler's log (TP rank 0's, as SGLang logs its decode stats):

    DeFT decode sharing: steps=40 attended_kv_tokens=52480 unique_kv_tokens=6170 ratio=8.506 plan_host_us=182.4 steady_steps=38 total_steps=120 total_attended_kv_tokens=150000 total_unique_kv_tokens=20000

- ``attended_kv_tokens``: KV tokens the steps attended, summed over requests (what a per-request
  decode kernel reads);
- ``unique_kv_tokens``: KV tokens in the steps' KV trees (what the deft path reads: each once);
- ``ratio``: attended / unique (1.0 means nothing was shared);
- ``window_ratio`` (models with sliding-window layers only): the same for those layers alone, whose queries
  attend their windows. Then the three fields above are per attention layer, averaged over the model's layers
  (a window layer counts its windows' tokens), so that they say what the whole model's decode reads: on Gemma-3,
  five layers in six are window layers;
- ``plan_host_us``: host time per step of the backend's per-step work (KV tree from the radix
  tree, plan, metadata copies enqueued), averaged over the steps; wall-clock time of the scheduler's
  thread, without waiting for the device (nothing there waits for the GPU's work, but an upload may wait for
  the pinned staging slot it reuses, whose copy four uploads earlier is normally long done);
- ``steady_steps``: steps of the window whose plan was the last one updated on the device, not
  planned on the host (``sglang_deft.step_planner``; the plan of the layers without a sliding window: the window
  layers' plan takes steady steps of its own, which this line does not count);
- ``total_*``: the same from the server's start to the end of this line's window.

When decoding pauses for ``SGLANG_DEFT_SHARING_IDLE_S`` seconds (1 by default; 0 turns it off) with steps not yet
logged, the backend's meter logs them as a shorter window (``steps`` under the interval), so that a run shorter
than the interval, and a run's last steps, show up too.

With data parallelism (``--dp-size``) every DP rank's scheduler keeps its own meter; SGLang prefixes its lines
with ``DPn``. Tests and tools read the lines with :func:`parse_sharing_lines`.
"""
from __future__ import annotations

import logging
import re
import threading
import time
import weakref
from dataclasses import dataclass, field

from sglang_deft.env_numbers import env_number

logger = logging.getLogger(__name__)

LOG_PREFIX = "DeFT decode sharing:"
IDLE_ENV = "SGLANG_DEFT_SHARING_IDLE_S"
_FIELD = re.compile(r"(\w+)=([0-9.]+)")


@dataclass
class SharingMeter:
    interval: int  # decode steps per log line
    # The fraction of the model's attention layers that are sliding-window layers (0: none, and no window counts)
    window_share: float = 0.0
    # KV tokens of the layers without a window, and of the window layers (window_*): this line's steps, and all
    steps: int = 0
    attended: int = 0
    unique: int = 0
    window_attended: int = 0
    window_unique: int = 0
    total_steps: int = 0
    total_attended: int = 0
    total_unique: int = 0
    total_window_attended: int = 0
    total_window_unique: int = 0
    host_s: float = 0.0  # per-step host time of the steps in the window, summed
    steady: int = 0  # steady steps in the window
    log: bool = True  # this process logs the lines (one TP rank of several does)
    # Seconds without a step after which the steps not yet logged are (None: only every ``interval`` steps). A
    # watcher thread waits for it while steps are pending; the scheduler's thread records, so both hold the lock.
    idle_s: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)
    _last_step: float = field(default=0.0, init=False, repr=False, compare=False)
    _watching: bool = field(default=False, init=False, repr=False, compare=False)  # a watcher thread runs

    def record(self, attended_tokens: int, unique_tokens: int, host_s: float = 0.0, steady: bool = False,
               window: tuple[int, int] | None = None) -> None:
        """Count one decode step (``host_s``: its per-step host time; ``steady``: its plan was updated
        on the device; ``window``: the window layers' attended and unique tokens, which a meter with
        ``window_share`` needs); logs and restarts the window every ``interval`` steps."""
        if (window is None) != (self.window_share == 0):
            raise ValueError(f"a step's window counts {window} for a model whose window layers are "
                             f"{self.window_share:.3f} of its layers")
        window_attended, window_unique = window or (0, 0)
        with self._lock:
            self.steps += 1
            self.steady += steady
            self.attended += attended_tokens
            self.unique += unique_tokens
            self.window_attended += window_attended
            self.window_unique += window_unique
            self.host_s += host_s
            self.total_steps += 1
            self.total_attended += attended_tokens
            self.total_unique += unique_tokens
            self.total_window_attended += window_attended
            self.total_window_unique += window_unique
            self._last_step = time.monotonic()
            if self.steps >= self.interval:
                self._log_window()
            elif self.log and self.idle_s is not None and not self._watching:
                # One thread per pause to wait for, not one per step: it ends once nothing is pending, and says so
                # under the lock, so that a step recorded as it ends starts the next one.
                self._watching = True
                threading.Thread(target=_log_when_idle, args=(weakref.ref(self),), name="deft-sharing-idle",
                                 daemon=True).start()

    def _log_window(self) -> None:
        """Log the window (on the logging rank) and restart it; the caller holds the lock."""
        if self.log:
            logger.info(self.format_line())
        self.steps = self.attended = self.unique = self.window_attended = self.window_unique = self.steady = 0
        self.host_s = 0.0

    def log_if_idle(self, now: float) -> float | None:
        """The watcher's turn: log the pending steps if none came for ``idle_s`` by ``now``. Returns the seconds
        until the pause would be long enough, or None when nothing is pending any more (the watcher then ends)."""
        with self._lock:
            if self.steps:
                wait = self._last_step + self.idle_s - now
                if wait > 0:
                    return wait
                self._log_window()
            self._watching = False
            return None

    def _per_layer(self, tokens: int, window_tokens: int) -> float:
        return (1 - self.window_share) * tokens + self.window_share * window_tokens

    def format_line(self) -> str:
        attended = self._per_layer(self.attended, self.window_attended)
        unique = self._per_layer(self.unique, self.window_unique)
        ratio = attended / unique if unique else 1.0
        window = ""
        if self.window_share:
            window = f" window_ratio={self.window_attended / self.window_unique if self.window_unique else 1.0:.3f}"
        return (
            f"{LOG_PREFIX} steps={self.steps} attended_kv_tokens={attended:.0f} "
            f"unique_kv_tokens={unique:.0f} ratio={ratio:.3f}{window} "
            f"plan_host_us={1e6 * self.host_s / max(self.steps, 1):.1f} steady_steps={self.steady} "
            f"total_steps={self.total_steps} "
            f"total_attended_kv_tokens={self._per_layer(self.total_attended, self.total_window_attended):.0f} "
            f"total_unique_kv_tokens={self._per_layer(self.total_unique, self.total_window_unique):.0f}"
        )


MAX_IDLE_S = 86400


def sharing_idle_s() -> float | None:
    """The pause after which a meter logs its pending steps, from ``SGLANG_DEFT_SHARING_IDLE_S`` (seconds, 1 by
    default; 0: never, lines only every ``--decode-log-interval`` steps; at most a day: past ~9e9 s the watcher's
    sleep raised OverflowError, which ended its thread and every pause line after)."""
    idle = env_number(IDLE_ENV, "1", float, lambda s: 0 <= s <= MAX_IDLE_S,
                      f"seconds from 0 to {MAX_IDLE_S} without a decode step after which the sharing line logs the "
                      "steps not yet logged (0 turns it off)")
    return idle or None


def _log_when_idle(meter_ref: weakref.ref) -> None:
    """The watcher thread: sleeps until the meter's steps pause for its ``idle_s``, logs them, ends. It holds the
    meter weakly, so a backend that goes away takes its meter with it."""
    while True:
        meter = meter_ref()
        wait = meter.log_if_idle(time.monotonic()) if meter is not None else None
        del meter
        if wait is None:
            return
        time.sleep(wait)


_DP_RANK = re.compile(r"\bDP(\d+)\b")
_LAST_FIELD = "total_unique_kv_tokens"


def parse_sharing_lines(log_text: str) -> list[dict[str, float]]:
    """Every sharing line in ``log_text``, as {field: value}, in order; ``dp_rank`` too where SGLang's prefix
    names one. A line cut short before its last field (a log read while the server writes it) is left out; one cut
    inside its last number cannot be told from a whole one, so a log still being written is passed up to its last
    newline (``demo.complete_lines``)."""
    rows = []
    for line in log_text.splitlines():
        at = line.find(LOG_PREFIX)
        if at >= 0:
            row = {k: float(v) for k, v in _FIELD.findall(line[at + len(LOG_PREFIX):])}
            if _LAST_FIELD not in row:
                continue
            if rank := _DP_RANK.search(line[:at]):
                row["dp_rank"] = float(rank[1])
            rows.append(row)
    return rows
