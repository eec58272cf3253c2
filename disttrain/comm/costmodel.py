"""Alpha-beta-gamma cost model of every collective algorithm, its calibration, and algorithm="auto".

The formulas follow Thakur, Rabenseifner & Gropp, "Optimization of Collective Communication
Operations in MPICH" (IJHPCA 2005): a message of m bytes costs alpha + m*beta, reducing m bytes
costs m*gamma. n is the reduced vector in bytes, p the ranks, p2 the largest power of two <= p,
S the pipeline segments, h the tree height, k the most children of a tree node (1 when p == 2).
A pipelined reduce-then-broadcast takes 2h + S - 1 segment steps (the last segment reaches the
root after h + S - 1 and the leaves h steps later); each step is bounded by the busiest node: an interior node receives k segments from
below and one from above while sending one up and k down, and a simultaneous send+receive of m
bytes costs m*beta (that is how beta is measured), hence the (k+1) beta per segment; in the double
tree a rank is interior in one tree and a leaf (one segment each way) in the other.
Every algorithm also pays a fixed software overhead o_a per call (LogP's "o": Python, request
objects, scratch buffers), which is what makes the latency-optimal algorithm lose to the MPI
library's C code for tiny messages.

  ring          o + 2(p-1)(alpha*ceil(n/(p*seg)) + n/p beta) + (p-1) n/p gamma
  butterfly     o + lg p2 (alpha + n beta + n gamma)                        (+ fold if p != p2)
  rabenseifner  o + 2 lg p2 alpha + (p2-1)/p2 n (2 beta + gamma)              (+ fold)
  tree          o + (2h + S - 1)((2k+2) alpha + n/S ((k+1) beta + k gamma))
  double_tree   o + (2h + S - 1)((2k+4) alpha + n/(2S) ((k+2) beta + k gamma))  each tree carries n/2
  ps (S srv)    o + 2(p-1) alpha + (p-1) n/S (2 beta + gamma)
  fold          2 (alpha + n beta) + n gamma

beta and gamma depend on the working set: a vector that fits in cache moves and reduces several
times faster than one streamed from DRAM, so both are measured at 1 MiB and at 32 MiB and
interpolated in log(n) between (constant outside). "mpi" (the library's collective) gets no
formula - MPICH switches among internal algorithms by size, so we could not write an honest one -
calibrate() measures it from 8 B to 64 MiB and the model interpolates that table in log-log.

Measurements are made on the communicator itself with every rank active at once (what the
algorithms do, so shared-memory bandwidth contention is included), and the slowest rank's value
is kept. Calibration is collective and takes about a second; its result is cached per
communicator size in memory and on disk, and rank 0's parameters are broadcast so that every rank
makes the same choice (different choices on different ranks would deadlock).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from ..log import logger
from ..registry import split
from . import config
from .kernels import reduce_into
from .ops import SUM
from .p2p import TAG_XCHG, pow2_below
from .tree import tree_links

SMALL, LARGE = 1 << 20, 32 << 20  # working sets at which beta and gamma are measured
#: For latency-bound messages (< LATENCY_BOUND bytes) "auto" leaves the MPI library's own
#: collective only for an algorithm predicted SWITCH_MARGIN times faster: there the prediction is
#: dominated by per-call software overheads and scheduler jitter (+-25% here, README), and where
#: two choices are that close the mature C implementation is the safer bet. Bandwidth-bound
#: predictions are tighter and switch on any predicted gain.
SWITCH_MARGIN, LATENCY_BOUND = 1.25, 256 << 10


@dataclass
class CostParams:
    """Calibrated machine parameters for one communicator size (seconds, seconds per byte)."""

    p: int
    alpha: float = 3e-6
    beta: float = 1.0e-10  # at SMALL bytes (cache-resident)
    gamma: float = 3.0e-11
    beta_large: float = 1.6e-10  # at LARGE bytes (DRAM)
    gamma_large: float = 1.2e-10
    overhead: dict = field(default_factory=dict)  # algorithm -> o (s per call)
    native: list = field(default_factory=list)  # [(bytes, seconds)] of the library's allreduce
    source: str = "defaults"


# ----------------------------------------------------------------------------------- formulas
def _interp(c: CostParams, n: float, small: float, large: float) -> float:
    w = min(1.0, max(0.0, (math.log(max(n, 1)) - math.log(SMALL)) / (math.log(LARGE) - math.log(SMALL))))
    return math.exp((1 - w) * math.log(small) + w * math.log(large))


def _bg(c: CostParams, n: float) -> tuple[float, float]:
    return _interp(c, n, c.beta, c.beta_large), _interp(c, n, c.gamma, c.gamma_large)


def _fold(c: CostParams, n: float) -> float:
    if c.p == pow2_below(c.p):
        return 0.0
    b, g = _bg(c, n)
    return 2 * (c.alpha + n * b) + n * g


def _segments(n: float) -> int:
    return max(1, math.ceil(n / config.current().segment_bytes))


def _tree_shape(p: int) -> tuple[int, int]:
    """(height, most children of any node) of the in-order tree."""
    parent, children = tree_links(p)
    h = 0
    for r in range(p):
        d, q = 0, r
        while parent[q] >= 0:
            q, d = parent[q], d + 1
        h = max(h, d)
    return h, max(len(ch) for ch in children)


def t_ring(c: CostParams, n: float) -> float:
    p, (b, g) = c.p, _bg(c, n)
    return 2 * (p - 1) * (c.alpha * _segments(n / p) + n / p * b) + (p - 1) * n / p * g


def t_butterfly(c: CostParams, n: float) -> float:
    b, g = _bg(c, n)
    return _fold(c, n) + math.log2(pow2_below(c.p)) * (c.alpha + n * b + n * g)


def t_rabenseifner(c: CostParams, n: float) -> float:
    p2, (b, g) = pow2_below(c.p), _bg(c, n)
    return _fold(c, n) + 2 * math.log2(p2) * c.alpha + (p2 - 1) / p2 * n * (2 * b + g)


def t_tree(c: CostParams, n: float) -> float:
    (h, k), s, (b, g) = _tree_shape(c.p), _segments(n), _bg(c, n)
    inner = k + (c.p > 2)  # the busiest node's segments in (= out) per step; the root has no parent
    return (2 * h + s - 1) * (2 * inner * c.alpha + n / s * (inner * b + k * g))


def t_double_tree(c: CostParams, n: float) -> float:
    (h, k), s, (b, g) = _tree_shape(c.p), _segments(n / 2), _bg(c, n)
    inner = k + (c.p > 2) + 1  # interior in one tree, plus one segment each way as a leaf of the other
    return (2 * h + s - 1) * (2 * inner * c.alpha + n / (2 * s) * (inner * b + k * g))


def t_ps(c: CostParams, n: float, servers: int = 0) -> float:
    p, (b, g) = c.p, _bg(c, n)
    s = min(p, servers or config.current().ps_servers or p)
    return 2 * (p - 1) * c.alpha + (p - 1) * n / s * (2 * b + g)


def t_native(c: CostParams, n: float) -> float:
    """Log-log interpolation of the measured library allreduce (linear extrapolation outside)."""
    if not c.native:  # uncalibrated: assume the library matches our best algorithm, minus Python
        return min(t_butterfly(c, n), t_rabenseifner(c, n))
    xs = np.log([max(b, 1) for b, _ in c.native])
    ys = np.log([t for _, t in c.native])
    x = math.log(max(n, 1))
    if x <= xs[0]:
        return float(math.exp(ys[0]))
    if x >= xs[-1]:
        return float(c.native[-1][1] * n / c.native[-1][0])
    return float(math.exp(np.interp(x, xs, ys)))


ALLREDUCE_MODELS = {"ring": t_ring, "tree": t_tree, "double_tree": t_double_tree, "butterfly": t_butterfly,
                    "rabenseifner": t_rabenseifner, "ps": t_ps, "mpi": t_native}
#: Software overheads of the alltoall algorithms (Python and NumPy bookkeeping), measured with
#: scripts/bench_collectives.py --collective alltoall at p=2 on the development machine; not yet
#: part of calibrate().
_A2A_OVERHEAD = {"bruck_round": 25e-6, "pairwise": 7e-6}
_DEFAULT_OVERHEAD = {"ring": 25e-6, "tree": 15e-6, "double_tree": 30e-6, "butterfly": 5e-6,
                     "rabenseifner": 15e-6, "ps": 20e-6, "mpi": 1.5e-6}


def predict(c: CostParams, algorithm: str, nbytes: int) -> float:
    """Predicted seconds for one allreduce of `nbytes` with `algorithm` ("ps:S" allowed)."""
    if c.p == 1:
        return c.overhead.get("mpi", 1e-6)
    base, param = split(algorithm)
    o = c.overhead.get(base, _DEFAULT_OVERHEAD[base]) if base != "mpi" or not c.native else 0.0
    if base == "ps" and param:
        return o + t_ps(c, nbytes, int(param))
    return o + ALLREDUCE_MODELS[base](c, nbytes)


# -------------------------------------------------------------------------------- calibration
def _timed(fn, reps: int, rounds: int = 5, stat=np.median) -> float:
    """`stat` over `rounds` batches of the mean time of `reps` calls.

    Latencies (alpha, overheads, small messages) use the minimum: on a shared host noise only ever
    adds time (a descheduled partner), so the fastest batch is the least disturbed estimate.
    Bandwidths use the median.
    """
    fn()
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        ts.append((time.perf_counter() - t) / reps)
    return float(stat(ts))


def measure(comm) -> CostParams:
    """Measure alpha, beta, gamma, per-algorithm overheads and the library's allreduce on `comm`
    (collective). Every rank returns identical values: each measurement is reduced with MAX."""
    from mpi4py import MPI

    from .registry import ALLREDUCE

    p, r = comm.Get_size(), comm.Get_rank()
    right, left = (r + 1) % p, (r - 1) % p

    def xchg(nb):
        s, d = np.ones(max(1, nb // 4), np.float32), np.empty(max(1, nb // 4), np.float32)
        return lambda: comm.Sendrecv(s, right, TAG_XCHG, d, left, TAG_XCHG)

    def reduce(nb):
        a, b = np.ones(nb // 4, np.float32), np.ones(nb // 4, np.float32)
        return lambda: reduce_into(a, b, SUM)

    comm.Barrier()
    if p > 1:
        for _ in range(200):  # settle: connections, page faults, the partner arriving late
            xchg(8)()
    alpha = _timed(xchg(8), 100, stat=np.min) if p > 1 else 1e-6
    vals = [alpha]
    for nb in (SMALL, LARGE):  # beta: bytes moved each way in a simultaneous exchange
        comm.Barrier()
        vals.append(max(1e-13, (_timed(xchg(nb), 8 if nb == SMALL else 1) - alpha) / nb) if p > 1 else 1e-12)
        comm.Barrier()
        vals.append(_timed(reduce(nb), 8 if nb == SMALL else 1) / nb)
    native_sizes = (8, 1 << 10, 1 << 13, 1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24, 1 << 26)
    for nb in native_sizes:
        x = np.ones(nb // 4, np.float32)
        comm.Barrier()
        vals.append(_timed(lambda: comm.Allreduce(MPI.IN_PLACE, x, op=MPI.SUM), 20 if nb < 1 << 18 else 1,
                           stat=np.min if nb < 1 << 16 else np.median))
    tiny = np.ones(2, np.float32)
    names = list(ALLREDUCE_MODELS)
    for name in names:  # o: the fixed cost of one call with next to no data
        fn = ALLREDUCE.resolve(name)
        comm.Barrier()
        vals.append(_timed(lambda: fn(comm, tiny, SUM), 30, stat=np.min))
    v = np.array(vals)
    comm.Allreduce(MPI.IN_PLACE, v, op=MPI.MAX)  # the slowest rank decides a collective's time
    nnat = len(native_sizes)
    c = CostParams(p, float(v[0]), float(v[1]), float(v[2]), float(v[3]), float(v[4]),
                   native=[(nb, float(t)) for nb, t in zip(native_sizes, v[5:5 + nnat])], source="measured")
    base = {name: ALLREDUCE_MODELS[name](c, 8) for name in names if name != "mpi"}
    c.overhead = {name: max(0.0, float(t) - base.get(name, float(t))) for name, t in zip(names, v[5 + nnat:])}
    c.overhead["mpi"] = 0.0  # the native table already includes it
    return c


def calibrate(group=None, save: str | None = None) -> CostParams:
    """Measure the machine parameters on a group and install them for that group only.

    Collective over the group; takes about a second. The parameters belong to the group's own
    communicators: another group of the same size keeps its own (a per-size table made ranks of
    one group choose differently once they had calibrated different groups - a hang). `save`
    writes them as JSON (group rank 0) for ``DISTTRAIN_COSTMODEL=FILE`` or the per-user cache
    that later jobs load automatically.

    Example:
        >>> dt.calibrate()      # then algorithm="auto" uses the measured parameters
    """
    from ..runtime import as_group

    g = as_group(group)
    c = measure(g.comm)
    install(c, g.comm, g.async_comm)
    if save and g.rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(save)), exist_ok=True)
        with open(save, "w") as f:
            json.dump(asdict(c), f, indent=1)
    return c


# ---------------------------------------------------------------------------------- choosing
# The parameters belong to a communicator (keyed by its MPI handle), live in the settings snapshot
# (config.Config.params, replaced copy-on-write) and are decided by the group's rank 0 and
# broadcast whenever a communicator is created (ensure): every member of a group holds the same
# object's values, whatever files each host has, and an asynchronous collective uses the
# parameters current when it was submitted. A communicator that was never registered (a raw
# communicator handed to the algorithms) uses the built-in defaults, which are the same everywhere.
_defaults: dict = {}  # p -> CostParams(p): deterministic, identical on every rank


def params_of(comm, snapshot=None) -> CostParams:
    """The cost parameters "auto" uses on `comm`."""
    c = (snapshot or config.current()).params.get(comm.handle)
    if c is None:
        p = comm.Get_size()
        c = _defaults.get(p) or _defaults.setdefault(p, CostParams(p))
    return c


def install(c: CostParams, *comms) -> None:
    """Make `c` the parameters of every communicator in `comms` (on this rank; callers are collective)."""
    c.native = [tuple(x) for x in c.native]
    params = dict(config.settings.params)
    for comm in comms:
        if comm is not None:
            params[comm.handle] = c
    config.update(params=params)


def forget(*comms) -> None:
    """Drop the parameters of communicators that are about to be freed (their handles get reused)."""
    params = dict(config.settings.params)
    for comm in comms:
        if comm is not None:
            params.pop(comm.handle, None)
    config.update(params=params)


def _cache_file(comm) -> str:
    """Per-user cache, keyed by ranks and hosts: 4 ranks on one node and on two are different machines."""
    from mpi4py import MPI

    hosts = len(set(comm.allgather(MPI.Get_processor_name())))
    root = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return os.path.join(root, "disttrain", f"costmodel-p{comm.Get_size()}-hosts{hosts}.json")


def _parse(d, p: int) -> CostParams:
    """CostParams from a loaded JSON object; ValueError saying what is wrong with it."""
    if not isinstance(d, dict):
        raise ValueError("not a JSON object")
    unknown = set(d) - {f.name for f in fields(CostParams)}
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}")
    if d.get("p") != p:
        raise ValueError(f"calibrated for p={d.get('p')!r}, this group has p={p}")
    c = CostParams(**d)
    nums = [c.alpha, c.beta, c.gamma, c.beta_large, c.gamma_large]
    if not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in nums):
        raise ValueError(f"alpha/beta/gamma must be finite positive numbers, got {nums}")
    if not isinstance(c.overhead, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and math.isfinite(v) and v >= 0
            for k, v in c.overhead.items()):
        raise ValueError("overhead must map algorithm names to non-negative seconds")
    try:
        c.native = [(float(b), float(t)) for b, t in c.native]
    except (TypeError, ValueError):
        raise ValueError("native must be a list of [bytes, seconds] pairs") from None
    if not all(b > 0 and t > 0 and math.isfinite(t) for b, t in c.native) or \
            any(c.native[i][0] >= c.native[i + 1][0] for i in range(len(c.native) - 1)):
        raise ValueError("native must list positive [bytes, seconds] pairs by increasing bytes")
    c.native = [(int(b), t) for b, t in c.native]
    return c


def _read(path: str, p: int, explicit: bool):
    """(params dict or None, message or None, fatal) - run on group rank 0 only."""
    try:
        with open(path) as f:
            d = json.load(f)
        return asdict(_parse(d, p)), None, False
    except FileNotFoundError:
        if explicit:
            return None, f"DISTTRAIN_COSTMODEL={path}: no such file (calibrate with disttrain-costmodel " \
                         "--save FILE, or unset it to use the per-user cache / built-in defaults)", True
        return None, None, False
    except (OSError, ValueError, TypeError) as e:
        if explicit and "calibrated for p=" not in str(e):
            return None, f"DISTTRAIN_COSTMODEL={path} is not a usable cost-model file: {e}", True
        if explicit:  # a file for the world used by a sub-group of another size: defaults, quietly
            return None, None, False
        return None, f"ignoring the cost-model cache {path} ({e}); using the built-in defaults - " \
                     "re-create it with disttrain-costmodel", False


def ensure(comm, *also) -> CostParams:
    """Decide and install the parameters of a new communicator (collective over `comm`).

    Called for every communicator disttrain creates (init, new_group, meshes) - never lazily inside
    a collective. Group rank 0 reads ``DISTTRAIN_COSTMODEL`` (a JSON file written by calibrate)
    or the per-user cache file and broadcasts the result, so every member decides alike whatever
    files its host has; ``DISTTRAIN_COSTMODEL=measure`` calibrates the group instead, and
    ``=defaults`` (or no file) uses built-in values. A malformed or foreign cache file is a warning
    (defaults are used); a missing or malformed explicit file is a CollectiveError on every rank.
    `also` are further communicators with the same members (the group's asynchronous one).
    """
    from .errors import CollectiveError

    # group rank 0's setting decides for everyone: an environment that differs on one host must
    # not send ranks into different collectives below
    spec = comm.bcast(config.current().costmodel_file, root=0)
    if spec == "measure":
        c = measure(comm)
        install(c, comm, *also)
        return c
    path = spec if spec not in ("", "defaults") else (_cache_file(comm) if spec == "" else "")
    res = _read(path, comm.Get_size(), explicit=bool(spec)) if (comm.Get_rank() == 0 and path) else (None, None, False)
    loaded, msg, fatal = comm.bcast(res, root=0)
    if fatal:
        raise CollectiveError(msg)
    if msg and comm.Get_rank() == 0:
        logger.warning(msg)
    c = CostParams(**loaded) if loaded else CostParams(comm.Get_size())
    install(c, comm, *also)
    return c


def choose(family: str, comm, nbytes: int, dtype) -> str:
    """The algorithm "auto" runs for this family on `comm` for this message size and dtype.

    A pure function of the communicator's parameters and the settings snapshot, so every member
    of a group picks the same algorithm."""
    s = config.current()
    c = params_of(comm, s)
    key = (family, int(nbytes).bit_length(), dtype, s.segment_bytes, s.ps_servers)
    choices = c.__dict__.setdefault("_choices", {})
    name = choices.get(key)
    if name is None:
        name = choices[key] = _decide(family, c, 1 << (key[1] - 1) if nbytes else 0)
    return name


def _decide(family: str, c: CostParams, nbytes: int) -> str:
    if c.p == 1:
        return "mpi"
    if family == "allreduce":
        best = min(ALLREDUCE_MODELS, key=lambda a: predict(c, a, nbytes))
        margin = SWITCH_MARGIN if nbytes < LATENCY_BOUND else 1.0
        return best if predict(c, best, nbytes) * margin < predict(c, "mpi", nbytes) else "mpi"
    b, g = _bg(c, nbytes)
    if family == "reduce_scatter":  # half a ring allreduce vs half the library's allreduce
        ring = c.overhead.get("ring", _DEFAULT_OVERHEAD["ring"]) / 2 + t_ring(c, nbytes) / 2
        return "ring" if ring < t_native(c, nbytes) / 2 else "mpi"
    if family == "alltoall":  # Bruck: lg p rounds of ~n/2 bytes (+ a size header); pairwise: p-1 of n/p
        lg = math.ceil(math.log2(c.p))
        bruck = lg * (_A2A_OVERHEAD["bruck_round"] + 2 * c.alpha + nbytes / 2 * b)
        pairwise = _A2A_OVERHEAD["pairwise"] + (c.p - 1) * (c.alpha + nbytes / c.p * b)
        return "bruck" if bruck < pairwise else "pairwise"
    return "mpi"  # broadcast / allgather: the library's versions are at least as good here


# ----------------------------------------------------------------------------- command line
def main(argv=None) -> None:
    """Calibrate, then print predicted vs measured time of every allreduce algorithm per size.

    mpiexec -n 2 python scripts/costmodel_check.py [--sizes 1M,4M,16M,64M] [--json out.json]
    """
    import argparse

    import disttrain as dt

    ap = argparse.ArgumentParser(description=main.__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="8,4K,64K,1M,4M,16M,64M", help="bytes, K/M suffixes")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--save", default="", help="write the calibrated parameters here (default: the per-user "
                    "cache that later jobs load)")
    ap.add_argument("--json", default="", help="write the comparison rows to this JSON file")
    a = ap.parse_args(argv)
    dt.init()
    dt.set_validation(False)
    comm = dt.world().comm
    c = calibrate(save=a.save or _cache_file(comm))
    rows = []
    if dt.rank() == 0:
        print(f"p={c.p} alpha={c.alpha * 1e6:.2f} us  1/beta={1 / c.beta / 1e9:.2f} (1 MiB) "
              f"{1 / c.beta_large / 1e9:.2f} (32 MiB) GB/s  1/gamma={1 / c.gamma / 1e9:.2f} / "
              f"{1 / c.gamma_large / 1e9:.2f} GB/s  o[us]=" +
              " ".join(f"{k}:{v * 1e6:.0f}" for k, v in c.overhead.items()))
        print(f"{'algorithm':>13} {'bytes':>10} {'predicted_us':>13} {'measured_us':>12} {'error':>7}")
    for s in a.sizes.split(","):
        nb = int(float(s.rstrip("KMkm")) * {"K": 1 << 10, "M": 1 << 20}.get(s[-1].upper(), 1))
        x = np.ones(max(1, nb // 4), np.float32)
        for alg in ALLREDUCE_MODELS:
            comm.Barrier()
            t = _timed(lambda: dt.allreduce_(x, algorithm=alg), a.reps)
            t = comm.allreduce(t, op=__import__("mpi4py").MPI.MAX)
            pred = predict(c, alg, x.nbytes)
            rows.append(dict(algorithm=alg, bytes=x.nbytes, predicted_s=pred, measured_s=t, p=c.p))
            if dt.rank() == 0:
                print(f"{alg:>13} {x.nbytes:>10} {pred * 1e6:>13.1f} {t * 1e6:>12.1f} {(pred - t) / t:>+7.0%}")
    if a.json and dt.rank() == 0:
        with open(a.json, "w") as f:
            json.dump(dict(params=asdict(c), rows=rows), f, indent=1)


