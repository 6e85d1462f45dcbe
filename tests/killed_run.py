"""Run ``python -m monai.bundle <args>`` and SIGKILL this very process at the point ``MEDIR_KILL_AT`` names.

Used by ``tests/test_faults.py`` to kill training exactly where it hurts most; the kill is the operating system's
(no handler, no cleanup), as when a machine loses power or an out-of-memory killer strikes.

``MEDIR_KILL_AT`` is one of:

* ``trainer_iteration:N``: when the trainer starts its N-th iteration in this process (mid-epoch);
* ``evaluator_iteration:N``: when the evaluator starts its N-th iteration (during validation);
* ``checkpoint_write:N``: when the N-th training checkpoint's bytes are all written under its temporary name,
  before the rename that gives it its final name (during a checkpoint write);
* ``after_seconds:S``: S seconds after start, wherever the run is (imports, data loading, training, writing).

Unset: the run is not killed.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import threading


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_at_iteration(role: str, number: int) -> None:
    from ignite.engine import Engine, Events

    fire = Engine._fire_event
    started = {"trainer": 0, "evaluator": 0}

    def counting_fire(engine, event_name, *args, **kwargs):
        if event_name == Events.ITERATION_STARTED:
            who = "evaluator" if "Evaluator" in type(engine).__name__ else "trainer"
            started[who] += 1
            if who == role and started[who] == number:
                _kill()
        return fire(engine, event_name, *args, **kwargs)

    Engine._fire_event = counting_fire


def _kill_in_checkpoint_write(number: int) -> None:
    import torch

    save = torch.save
    written = [0]

    def save_then_kill(obj, f, *args, **kwargs):
        save(obj, f, *args, **kwargs)
        if "checkpoint_iteration=" in os.path.basename(str(getattr(f, "name", f))):
            written[0] += 1
            if written[0] == number:
                f.flush()
                _kill()

    torch.save = save_then_kill


def main() -> None:
    kind, _, value = os.environ.get("MEDIR_KILL_AT", "").partition(":")
    if kind in ("trainer_iteration", "evaluator_iteration"):
        _kill_at_iteration(kind.split("_")[0], int(value))
    elif kind == "checkpoint_write":
        _kill_in_checkpoint_write(int(value))
    elif kind == "after_seconds":
        timer = threading.Timer(float(value), _kill)
        timer.daemon = True
        timer.start()
    elif kind:
        raise SystemExit(f"killed_run.py: unknown MEDIR_KILL_AT {kind!r}")
    sys.argv = ["monai.bundle", *sys.argv[1:]]
    runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
