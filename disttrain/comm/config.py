"""Run-time switches of the collectives layer, set from the environment or from code.

Every rank must use the same settings: validation on in one rank and off in another made the
ranks take different protocols (the fused shared-memory round against MPI_Allreduce) - a hang
for good (the lead's finding, engineer call8). So the public setter that changes what a rank
communicates, :func:`set_validation`, is *collective* after ``dt.init()``: every rank calls it at
the same point with the same value, and it begins with the world's validated round
(validate.check) carrying the new value - a rank that calls it alone meets its peers' next
collective's round and a rank that passes another value meets theirs: CollectiveError on every
rank naming both, never a hang. Before ``dt.init()`` it only records the value; ``dt.init()``
compares the values every rank set from code and raises everywhere if they differ (it never
silently overrides one rank's choice), and a value set from code wins over the environment.
:func:`set_verbose` stays local (one rank may log for debugging): the paths it selects meet in
the same rounds (tests/fuzz_disagree.py's "verbose" deviation). :func:`update` is internal: the
caller guarantees the same values on every rank (runtime.init, costmodel.install).

Settings are *immutable snapshots*: every change (``set_validation``, ``update``) installs a new
:class:`Config` object, and an asynchronous collective captures the snapshot current when it was
submitted (engine.py), so toggling a switch while handles are outstanding can never make the
communication thread of one rank take a different path from another's (issue 14, item 3).
Code reads the settings through :func:`current`: the submitting thread's snapshot on the
communication thread, the global one elsewhere.

Environment variables (read by ``dt.init()``):
    DISTTRAIN_VALIDATE=0        skip the cross-rank consistency check (see validate.py for its cost)
    DISTTRAIN_VERBOSE=1         log every collective (name, algorithm, bytes, time) to stderr
    DISTTRAIN_SEGMENT_BYTES=N   pipeline segment size of ring / tree / double_tree (default 2 MiB)
    DISTTRAIN_PS_SERVERS=K      parameter-server shards for algorithm="ps" (default: every rank)
    DISTTRAIN_COSTMODEL=FILE    calibrated cost-model parameters for algorithm="auto"
                                ("measure": calibrate every new group; "defaults": built-in values)
"""
from __future__ import annotations

import dataclasses
import os
import threading
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Config:
    validate: bool = True
    verbose: bool = False
    # Pipeline segment. Measured on shared memory (scripts/bench_collectives.py, README): every
    # "transfer" there is a CPU copy on the same core that reduces, so there is nothing to overlap
    # and fewer, larger segments win (ring at 16 MiB, p=2: 1.15x native with 512 KiB segments,
    # 1.27x with 2 MiB). Over a network the NIC's DMA overlaps the reduction and smaller segments
    # (256-512 KiB) pay off: set DISTTRAIN_SEGMENT_BYTES there.
    segment_bytes: int = 2 * 1024 * 1024
    ps_servers: int = 0  # 0 = every rank serves one shard
    costmodel_file: str = ""
    # communicator handle -> costmodel.CostParams; replaced as a whole (costmodel.install)
    params: dict = field(default_factory=dict, compare=False, repr=False)


settings = Config()  # the global snapshot; replaced (never mutated) by update()
#: fields set by the public setters before dt.init(): they win over the environment and are
#: compared across ranks by runtime.init
explicit: dict = {}
#: the fields whose values every rank must agree on (they decide what a rank communicates)
COLLECTIVE = ("validate",)
_agree = None  # runtime.install_agreement's hook: (kind, fields) -> None, collective once initialised


class _Local(threading.local):
    snapshot = None  # a class default: reading it needs no getattr fallback (hot path)


_tls = _Local()


def current() -> Config:
    """The settings in force on this thread: a submitted operation's snapshot, else the global."""
    return _tls.snapshot or settings


def update(**changes) -> Config:
    """Install a new global snapshot with `changes` applied; returns the previous one."""
    global settings
    old = settings
    settings = dataclasses.replace(settings, **changes)
    return old


def restore(snapshot: Config) -> None:
    """Make `snapshot` the global settings again (tests, context managers)."""
    global settings
    settings = snapshot


class bound:
    """Context manager: run the body with `snapshot` as this thread's settings (engine.py)."""

    __slots__ = ("snap", "prev")

    def __init__(self, snapshot: Config):
        self.snap = snapshot

    def __enter__(self):
        self.prev = _tls.snapshot
        _tls.snapshot = self.snap

    def __exit__(self, *exc):
        _tls.snapshot = self.prev
        return False


def _int_env(env, name: str, default: int, minimum: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        v = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if v < minimum:
        raise ValueError(f"{name}={raw!r} must be >= {minimum}")
    return v


#: the settings load_from_env reads (runtime.init installs group rank 0's values on every rank)
ENV_FIELDS = ("validate", "verbose", "segment_bytes", "ps_servers", "costmodel_file")


def load_from_env() -> None:
    env = os.environ
    update(validate=env.get("DISTTRAIN_VALIDATE", "1") not in ("0", "false", "no"),
           verbose=env.get("DISTTRAIN_VERBOSE", "0") not in ("0", "", "false", "no"),
           segment_bytes=_int_env(env, "DISTTRAIN_SEGMENT_BYTES", settings.segment_bytes, 1024),
           ps_servers=_int_env(env, "DISTTRAIN_PS_SERVERS", settings.ps_servers, 0),
           costmodel_file=env.get("DISTTRAIN_COSTMODEL", settings.costmodel_file))
    update(**explicit)  # set from code before dt.init(): the program's choice beats the environment


def install(agree) -> None:
    """Install the agreement of a collective setter (runtime.py: comm/ cannot import the runtime).
    `agree(kind, fields)` returns False before dt.init() (nothing to agree with yet) and, after
    it, runs the world's validated round or raises CollectiveError on every rank."""
    global _agree
    _agree = agree


def _set(kind: str, **changes) -> None:
    """A collective setter: agree on `changes` with every rank (after dt.init()), then install them."""
    if _agree is None or not _agree(kind, changes):
        explicit.update(changes)
    update(**changes)


def set_validation(enabled: bool) -> None:
    """Turn the cross-rank consistency check of every collective on or off.

    Collective after ``dt.init()``: every rank calls it at the same point with the same value. It
    begins with one validated round on the world carrying the value, so a rank that calls it
    alone, or with another value, raises CollectiveError on every rank (naming both calls)
    instead of hanging in the next collective. Before ``dt.init()`` it records the value, and
    ``dt.init()`` raises on every rank if the ranks recorded different values (a value set from
    code wins over ``DISTTRAIN_VALIDATE``).

    The check costs one 24-byte MPI_Allreduce per collective call (about one small-message
    latency: ~3-4 us between two processes on one host). Turn it off for hot loops that are known
    to be consistent, e.g. after the first training step has run with it on. Asynchronous
    collectives already submitted keep the setting they were submitted with. On a communicator
    whose ranks share one node, allreduce keeps its check either way: it rides in the
    shared-memory round that carries the data (or precedes the library's call) - about 1 us,
    and it is what keeps the ranks' paths together (README: call overhead).

    Args:
        enabled: True to check every collective's arguments across ranks, False to skip it.

    Example:
        >>> dt.set_validation(False)   # on every rank, at the same point
    """
    _set("set_validation", validate=bool(enabled))


def set_verbose(enabled: bool) -> None:
    """Log every collective call (name, algorithm, bytes, duration) to stderr.

    Local: one rank may switch it on alone (it changes no rank's messages - the logged path and
    the fused one meet in the same rounds). Set before ``dt.init()`` it wins over
    ``DISTTRAIN_VERBOSE``.

    Args:
        enabled: True to log, False to stop.

    Example:
        >>> dt.set_verbose(dt.rank() == 0)
    """
    explicit["verbose"] = bool(enabled)  # read by load_from_env only (dt.init())
    update(verbose=bool(enabled))
