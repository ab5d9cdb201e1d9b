"""Run train.py as Ctrl-C would meet it inside an epoch: `python tests/signal_in_a_step_call.py
CALL COUNT ARGS...` raises SIGINT COUNT times (1 or 2) while the CALL-th compiled call of
train_step runs, at a known step rather than at a moment a test would have to guess."""

from __future__ import annotations

import runpy
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machinery import steps  # noqa: E402

call, count = int(sys.argv[1]), int(sys.argv[2])
compiled_train_steps = steps.compiled_train_steps


def with_signals(*args, **kwargs):
    """steps.compiled_train_steps, whose `call`-th call is interrupted `count` times."""
    run = compiled_train_steps(*args, **kwargs)
    calls = 0

    def interrupted(batches):
        nonlocal calls
        calls += 1
        if calls == call:
            for _ in range(count):
                signal.raise_signal(signal.SIGINT)  # as Ctrl-C: the handler runs here, in the call
        return run(batches)

    return interrupted


steps.compiled_train_steps = with_signals
sys.argv = [str(ROOT / "train.py"), *sys.argv[3:]]
runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
