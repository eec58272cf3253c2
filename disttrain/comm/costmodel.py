"""Alpha-beta-gamma cost model of every collective algorithm, its calibration, and algorithm="auto".

The formulas follow Thakur, Rabenseifner & Gropp, "Optimization of Collective Communication
Operations in MPICH" (IJHPCA 2005): a message of n bytes costs alpha + n*beta, reducing n bytes
costs n*gamma. Here n is the size of the reduced vector in bytes, p the number of ranks, p2 the
largest power of two <= p, S the number of pipeline segments.

  ring          2(p-1)(alpha*ceil(n/(pS_b)) + n/p beta) + (p-1) n/p gamma
  butterfly     lg p2 (alpha + n beta + n gamma)                     (+ fold, if p != p2)
  rabenseifner  2 lg p2 alpha + 2 (p2-1)/p2 n beta + (p2-1)/p2 n gamma (+ fold)
  tree          (h + S - 1)(4 alpha + 4 n/S beta + 2 n/S gamma)       h = tree height
  double_tree   (h + S - 1)(4 alpha + 3 n/(2S) beta + n/S gamma)        every rank interior once
  ps (S srv)    2(p-1) alpha + 2 (p-1) n/S beta + (p-1) n/S gamma
  fold          2 (alpha + n beta) + n gamma  (non-power-of-two ranks fold in and out)

"mpi" (the library's own collective) has no formula we could honestly write - MPICH switches
among internal algorithms by size - so calibrate() measures it at a few sizes and the model
interpolates that table in log-log space.

alpha, beta and gamma are measured on the communicator itself: alpha and beta from simultaneous
neighbour exchanges (every rank sending and receiving at once, which is what the algorithms do,
so shared-memory bandwidth contention is included), gamma from the reduction kernel run on all
ranks at once. Calibration is collective and takes well under a second; its result is cached per
communicator size in memory and on disk, and rank 0's parameters are broadcast so that every rank
makes the same choice (different choices on different ranks would deadlock).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from . import config
from .kernels import reduce_into
from .ops import SUM
from .p2p import TAG_XCHG, pow2_below
from .tree import tree_links


@dataclass
class CostParams:
    """Calibrated machine parameters for one communicator size (seconds, seconds per byte)."""

    p: int
    alpha: float = 6e-6
    beta: float = 1.5e-10
    gamma: float = 2.5e-10
    native: list = field(default_factory=list)  # [(bytes, seconds)] of the library's allreduce
    source: str = "defaults"


# ----------------------------------------------------------------------------------- formulas
def _fold(c: CostParams, n: float) -> float:
    return 0.0 if c.p == pow2_below(c.p) else 2 * (c.alpha + n * c.beta) + n * c.gamma


def _segments(n: float) -> int:
    return max(1, math.ceil(n / config.settings.segment_bytes))


def _tree_height(p: int) -> int:
    parent, _ = tree_links(p)
    h = 0
    for r in range(p):
        d, q = 0, r
        while parent[q] >= 0:
            q, d = parent[q], d + 1
        h = max(h, d)
    return h


def t_ring(c: CostParams, n: float) -> float:
    p = c.p
    return 2 * (p - 1) * (c.alpha * _segments(n / p) + n / p * c.beta) + (p - 1) * n / p * c.gamma


def t_butterfly(c: CostParams, n: float) -> float:
    return _fold(c, n) + math.log2(pow2_below(c.p)) * (c.alpha + n * c.beta + n * c.gamma)


def t_rabenseifner(c: CostParams, n: float) -> float:
    p2 = pow2_below(c.p)
    return _fold(c, n) + 2 * math.log2(p2) * c.alpha + (p2 - 1) / p2 * n * (2 * c.beta + c.gamma)


def t_tree(c: CostParams, n: float) -> float:
    s = _segments(n)
    return (_tree_height(c.p) + s - 1) * (4 * c.alpha + n / s * (4 * c.beta + 2 * c.gamma))


def t_double_tree(c: CostParams, n: float) -> float:
    s = _segments(n / 2)
    return (_tree_height(c.p) + s - 1) * (4 * c.alpha + n / s * (1.5 * c.beta + c.gamma))


def t_ps(c: CostParams, n: float, servers: int = 0) -> float:
    p = c.p
    s = min(p, servers or config.settings.ps_servers or p)
    return 2 * (p - 1) * c.alpha + (p - 1) * n / s * (2 * c.beta + c.gamma)


def t_native(c: CostParams, n: float) -> float:
    """Log-log interpolation of the measured library allreduce (linear extrapolation outside)."""
    if not c.native:
        return t_rabenseifner(c, n) * 0.8 + c.alpha  # uncalibrated guess: the library's best, less our overhead
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


def predict(c: CostParams, algorithm: str, nbytes: int) -> float:
    base, _, param = algorithm.partition(":")
    if base == "ps" and param:
        return t_ps(c, nbytes, int(param))
    return ALLREDUCE_MODELS[base](c, nbytes)


# -------------------------------------------------------------------------------- calibration
def _timed(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def calibrate(group=None, save: str | None = None) -> CostParams:
    """Measure alpha, beta, gamma (and the library's allreduce) on a group; install and return them.

    Collective over the group. Takes ~0.2-1 s. `save` writes the parameters as JSON (rank 0).

    Example:
        >>> dt.calibrate()      # then algorithm="auto" uses the measured parameters
    """
    from mpi4py import MPI

    from ..runtime import as_group

    comm = as_group(group).comm
    p, r = comm.Get_size(), comm.Get_rank()
    right, left = (r + 1) % p, (r - 1) % p

    def xchg(nb):
        s, d = np.ones(max(1, nb // 4), np.float32), np.empty(max(1, nb // 4), np.float32)
        return lambda: comm.Sendrecv(s, right, TAG_XCHG, d, left, TAG_XCHG)

    comm.Barrier()
    if p > 1:
        alpha = _timed(xchg(8), 200)
        big = 4 << 20
        beta = max(1e-13, (_timed(xchg(big), 6) - alpha) / big)
    else:
        alpha, beta = 1e-6, 1e-11
    a, b = np.ones(1 << 20, np.float32), np.ones(1 << 20, np.float32)
    comm.Barrier()
    gamma = _timed(lambda: reduce_into(a, b, SUM), 8) / a.nbytes
    native = []
    for nb in (8, 1 << 10, 1 << 13, 1 << 16, 1 << 18, 1 << 20, 1 << 22):
        x = np.ones(nb // 4, np.float32)
        comm.Barrier()
        native.append((nb, _timed(lambda: comm.Allreduce(MPI.IN_PLACE, x, op=MPI.SUM), 30 if nb < 1 << 18 else 5)))
    vals = np.array([alpha, beta, gamma] + [t for _, t in native])
    comm.Allreduce(MPI.IN_PLACE, vals, op=MPI.MAX)  # the slowest rank decides a collective's time
    c = CostParams(p, float(vals[0]), float(vals[1]), float(vals[2]),
                   [(nb, float(t)) for (nb, _), t in zip(native, vals[3:])], "measured")
    install(comm, c)
    if save and r == 0:
        with open(save, "w") as f:
            json.dump(asdict(c), f, indent=1)
    return c


# ---------------------------------------------------------------------------------- choosing
_params: dict = {}  # communicator size -> CostParams
_choices: dict = {}  # (family, p, log2 bytes, dtype) -> name


def install(comm, c: CostParams) -> None:
    _params[c.p] = c
    for k in [k for k in _choices if k[1] == c.p]:
        del _choices[k]


def _cache_file(p: int) -> str:
    root = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return os.path.join(root, "disttrain", f"costmodel-p{p}.json")


def ensure(comm) -> CostParams:
    """Load the parameters for this communicator's size (collective; called by init/new_group).

    Group rank 0 reads DISTTRAIN_COSTMODEL (a JSON file written by calibrate) or the per-user
    cache file and broadcasts it, so every rank decides alike; with DISTTRAIN_COSTMODEL=measure the
    group calibrates instead; with neither, built-in defaults are used. Done at these fixed
    collective points - never lazily inside a collective, where the main and communication
    threads could reach "first use" in different orders on different ranks and deadlock.
    """
    p = comm.Get_size()
    if p in _params:
        return _params[p]
    spec = config.settings.costmodel_file
    if spec == "measure":
        return calibrate_comm(comm)
    loaded = None
    if comm.Get_rank() == 0 and spec != "defaults":
        try:
            with open(spec or _cache_file(p)) as f:
                d = json.load(f)
            loaded = d if int(d.get("p", -1)) == p else None
        except (OSError, ValueError):
            loaded = None
    loaded = comm.bcast(loaded, root=0)
    c = CostParams(**loaded) if loaded else CostParams(p)
    c.native = [tuple(x) for x in c.native]
    _params[p] = c
    return c


def calibrate_comm(comm) -> CostParams:
    from ..runtime import Group

    return calibrate(Group(tuple(range(comm.Get_size())), comm.Get_rank(), comm.Get_size(), comm, None))


def choose(family: str, comm, nbytes: int, dtype) -> str:
    """The algorithm "auto" runs for this family, communicator size, message size and dtype."""
    p = comm.Get_size()
    key = (family, p, int(nbytes).bit_length(), dtype)
    name = _choices.get(key)
    if name is None:
        name = _choices[key] = _decide(family, _params.get(p) or CostParams(p), 1 << (key[2] - 1) if nbytes else 0)
    return name


def _decide(family: str, c: CostParams, nbytes: int) -> str:
    if c.p == 1:
        return "mpi"
    if family == "allreduce":
        return min(ALLREDUCE_MODELS, key=lambda a: predict(c, a, nbytes))
    if family == "reduce_scatter":
        ring = (c.p - 1) * (c.alpha * _segments(nbytes / c.p) + nbytes / c.p * (c.beta + c.gamma))
        return "ring" if ring < 0.5 * t_native(c, nbytes) else "mpi"
    if family == "alltoall":
        lg = math.ceil(math.log2(c.p))
        bruck = lg * (2 * c.alpha + nbytes / 2 * c.beta)
        pairwise = (c.p - 1) * (c.alpha + nbytes / c.p * c.beta)
        return "bruck" if bruck < pairwise else "pairwise"
    return "mpi"  # broadcast / allgather: the library's versions are at least as good here


# ----------------------------------------------------------------------------- command line
def main(argv=None) -> None:
    """Print predicted vs measured time for every allreduce algorithm (run under mpiexec)."""
    import argparse

    import disttrain as dt

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--sizes", default="1K,64K,1M,4M,16M", help="bytes, K/M suffixes")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--save", default="", help="write the calibrated parameters to this JSON file")
    ap.add_argument("--json", default="", help="write the comparison rows to this JSON file")
    a = ap.parse_args(argv)
    dt.init()
    dt.set_validation(False)
    comm = dt.world().comm
    c = calibrate(save=a.save or _cache_file(comm.Get_size()))
    rows = []
    if dt.rank() == 0:
        print(f"p={c.p} alpha={c.alpha * 1e6:.2f} us  beta={1 / c.beta / 1e9:.2f} GB/s  "
              f"gamma={1 / c.gamma / 1e9:.2f} GB/s (reduce)")
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


if __name__ == "__main__":
    main()
