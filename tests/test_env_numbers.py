"""The deft backend's numeric environment variables (``sglang_deft.env_numbers``): each reader's default, the values
it takes, and the error that names the variable for one it cannot use."""
import pytest

from sglang_deft.kernel_check import ENV as VERIFY_ENV, verify_every
from sglang_deft.sharing_metrics import IDLE_ENV, sharing_idle_s
from sglang_deft.step_planner import STEADY_ENV, steady_steps

STEP_COUNT = "expected a number of decode steps >= 0"
SECONDS = "expected seconds from 0 to 86400"
ROOM = "expected a number of decode steps from 0 to 1024"

CASES = [
    *[(verify_every, VERIFY_ENV, raw, want, STEP_COUNT) for raw, want in [
        (None, 0), ("0", 0), ("3", 3), ("often", ValueError), ("-2", ValueError), ("1.5", ValueError),
        # int() takes these too: spaces, underscores, other scripts' digits
        (" 3", ValueError), ("1_000", ValueError), ("\u0663", ValueError), ("", ValueError)]],
    *[(sharing_idle_s, IDLE_ENV, raw, want, SECONDS) for raw, want in [
        (None, 1.0), ("0", None), ("2.5", 2.5), ("-1", ValueError), ("soon", ValueError), ("nan", ValueError),
        ("inf", ValueError), ("86400", 86400.0), ("1e10", ValueError), ("2.5e-1", 0.25), (".5", 0.5),
        ("1_0.5", ValueError)]],
    *[(steady_steps, STEADY_ENV, raw, want, ROOM) for raw, want in [
        (None, 64), ("0", 0), ("1024", 1024), ("-1", ValueError), ("1025", ValueError), ("often", ValueError),
        ("1.5", ValueError)]],
]


@pytest.mark.parametrize("read, name, raw, want, expected", CASES,
                         ids=[f"{name}={raw}" for _, name, raw, _, _ in CASES])
def test_each_variable_reads_its_values_and_names_what_it_cannot(monkeypatch, read, name, raw, want, expected):
    if raw is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, raw)
    if want is ValueError:
        with pytest.raises(ValueError, match=f"{name}={raw!r}: {expected}"):
            read()
    else:
        assert read() == want
