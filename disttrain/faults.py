"""Fault injection for the fault tests: die at a named point, on purpose.

    DISTTRAIN_FAULT_INJECT=checkpoint-write DISTTRAIN_FAULT_AT=3 DISTTRAIN_FAULT_RANK=0 ...

kills that rank with SIGKILL the 3rd time it reaches ``checkpoint-write`` (after the temporary
file is written, before it is renamed into place) - the moment a power cut would hurt most.
``DISTTRAIN_FAULT_ACTION=sleep:S`` makes that rank sleep S seconds at every hit instead (a
straggler: tests that act from outside at a moment they observe need a run slow enough to see it);
``exit`` makes it leave at the k-th hit with ``sys.exit(0)`` (a rank that quits while the others
still need it: the departure protocol of runtime.py must end the job naming it); ``raise`` raises
RuntimeError there (an exception on one rank, or in one thread of it: the abort hooks must end the
job naming it).
Unset (the default), ``point`` is one dictionary lookup.
"""
from __future__ import annotations

import os
import signal
import sys
import time

from . import groups

_hits: dict = {}


def point(name: str) -> None:
    if os.environ.get("DISTTRAIN_FAULT_INJECT") != name:
        return
    w = groups.current()
    if int(os.environ.get("DISTTRAIN_FAULT_RANK", "0")) != (w.rank if w is not None else 0):
        return
    action = os.environ.get("DISTTRAIN_FAULT_ACTION", "kill")
    if action.startswith("sleep:"):
        time.sleep(float(action[6:]))
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(os.environ.get("DISTTRAIN_FAULT_AT", "1")):
        if action == "exit":
            sys.exit(0)
        if action == "_exit":  # no exit hook, no MPI_Finalize: what Hydra takes for a finished rank
            os._exit(0)
        if action == "raise":
            raise RuntimeError(f"injected fault at {name} (DISTTRAIN_FAULT_ACTION=raise)")
        os.kill(os.getpid(), signal.SIGKILL)
