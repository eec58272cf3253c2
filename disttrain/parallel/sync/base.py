"""The --sync mode family's registry and base class (parallel/sync/__init__.py describes the hooks);
a module of its own so that each mode's module imports it without an import circle."""
from __future__ import annotations

from ...registry import Registry

SYNC_MODES = Registry("sync mode")


class SyncMode:
    """One way replicas agree on parameters. Subclasses register under ``SYNC_MODES``.

    Args:
        param: the text after the colon of ``--sync NAME:PARAM`` ("" when absent).
        cfg: the job's TrainConfig.
    """

    # False: the main job's metrics record, progress line and --eval-every must not communicate
    # (a mode whose workers run at their own pace: a collective there makes fast ones wait)
    collective_metrics = True
    # False: update()'s verdict is this rank's own (the parameter servers: no rank knows another's
    # at that step), so a rank that stops on non-finite gradients says why itself - the others
    # end through the departure protocol ("rank R has left the job")
    agreed_verdict = True

    def __init__(self, param: str, cfg):
        self.param, self.cfg = param, cfg

    @classmethod
    def problems(cls, param: str, cfg) -> list:
        """What is wrong with this mode under `cfg` (messages naming the flag), [] if nothing.
        Decided from the configuration alone, so every rank reaches the same verdict."""
        return []

    def dp_group(self, mesh):
        """The group DataParallel averages gradients over (default: the mesh's data-parallel group)."""
        return mesh.dp_group

    def start(self, run) -> None:
        """Called once the model, DataParallel and optimizer exist (before resuming)."""

    def more(self, run, step: int) -> bool:
        """Does this rank do step `step` (0-based)? The loop asks before every step and after it
        (is it the last). Default: ``--steps`` counts this rank's steps. Must not communicate."""
        return step < run.cfg.steps

    def update(self, run, step: int) -> bool:
        """Apply one step after this rank's backward; returns whether it was finite (applied).
        The verdict must be the same on every rank whose later communication depends on it."""
        raise NotImplementedError

    def finish(self, run) -> None:
        """Make the model the one to evaluate and checkpoint (e.g. a final average)."""

    def record(self) -> dict:
        """Metrics of the steps since the last call; {} if none. ``wait_s`` and ``bytes_sent_per_step``
        are this mode's own (seconds per step waited in its exchange, payload bytes per step): the
        main job adds DataParallel's gradient wait and bytes to them (job/metrics.py); others
        (``staleness_mean``, ``staleness_max``, ...) are recorded as they are."""
        return {}

    def summary(self) -> dict:
        """Fields for the final metrics record, after finish (e.g. steps per worker); {} if none."""
        return {}
