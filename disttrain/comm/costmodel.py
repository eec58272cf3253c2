"""Calibration of the alpha-beta-gamma cost model and algorithm="auto".

The model's vocabulary (CostParams, the beta/gamma interpolation, folding, segments) is in
cost.py; each algorithm registers its own formula beside its code (``cost=`` in
``@ALLREDUCE.register``, after Thakur, Rabenseifner & Gropp, IJHPCA 2005), so "auto" considers every
registered algorithm. "mpi" (the library's collective) gets no formula - MPICH switches among
internal algorithms by size - calibrate() measures it from 8 B to 64 MiB and its registered cost
interpolates that table.

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
from dataclasses import asdict, fields, replace

import numpy as np

from .. import mpi
from ..errors import CollectiveError
from ..groups import as_group
from ..log import logger
from ..registry import split
from . import config, topology, validate
from .cost import LARGE, SMALL, CostParams, across, bg
from .kernels import reduce_into
from .ops import SUM
from .p2p import TAG_XCHG
from .registry import ALLGATHER, ALLREDUCE, ALLTOALL, REDUCE_SCATTER

#: For latency-bound messages (< LATENCY_BOUND bytes) "auto" leaves the MPI library's own
#: collective only for an algorithm predicted SWITCH_MARGIN times faster: there the prediction is
#: dominated by per-call software overheads and scheduler jitter (+-25% here, README), and where
#: two choices are that close the mature C implementation is the safer bet. Bandwidth-bound
#: predictions are tighter and switch on any predicted gain.
SWITCH_MARGIN, LATENCY_BOUND = 1.25, 256 << 10
#: sizes at which calibrate() times the library's allreduce (its "mpi" cost interpolates them)
NATIVE_SIZES = (8, 1 << 10, 1 << 13, 1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24, 1 << 26)
#: bytes of the inter-node bandwidth exchange: bandwidth-bound even at 10 Gbit/s, and ~34 ms at 1
NET_BYTES = 4 << 20


#: Algorithms whose formulas model the nodes themselves (the rest are costed with cost.across on a
#: multi-node communicator: intra-node alpha/beta replaced by the network's through a shared port).
NODE_AWARE = ("shm", "hier")

def predict(c: CostParams, algorithm: str, nbytes: int) -> float:
    """Predicted seconds for one allreduce of `nbytes` with `algorithm` ("ps:S" allowed)."""
    if c.p == 1:
        return c.overhead.get("mpi", 1e-6)
    base, param = split(algorithm)
    formula, default_overhead = ALLREDUCE.costs[base]  # registered with the algorithm
    o = c.overhead.get(base, default_overhead) if base != "mpi" or not c.native else 0.0
    if c.hosts > 1 and base not in NODE_AWARE:  # a flat algorithm: its steps cross node ports
        c = across(c, ring_order=base == "ring")
    return o + (formula(c, nbytes, int(param)) if param else formula(c, nbytes))


# -------------------------------------------------------------------------------- calibration
def timed(fn, reps: int, rounds: int = 5, stat=np.median) -> float:
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
    (collective). Every rank returns identical values: each measurement is reduced with MAX.

    On a communicator spanning several nodes (its recorded topology) alpha and beta are measured
    inside the nodes (node communicators, all at once) and alpha_inter / beta_inter across them:
    every slice exchanges at once - as the two-level algorithm's second level does - and
    beta_inter is seconds per byte through one node's port (k slices share it)."""
    MPI = mpi.MPI
    t = topology.of(comm)
    multi = t is not None and t.nodes > 1
    link = t.node_comm if multi else comm

    def xchg(c, nb):
        q, r = c.Get_size(), c.Get_rank()
        s, d = np.ones(max(1, nb // 4), np.float32), np.empty(max(1, nb // 4), np.float32)
        return lambda: c.Sendrecv(s, (r + 1) % q, TAG_XCHG, d, (r - 1) % q, TAG_XCHG)

    def reduce(nb):
        a, b = np.ones(nb // 4, np.float32), np.ones(nb // 4, np.float32)
        return lambda: reduce_into(a, b, SUM)

    def latency(c):
        if c.Get_size() == 1:
            return 1e-6
        for _ in range(200):  # settle: connections, page faults, the partner arriving late
            xchg(c, 8)()
        return timed(xchg(c, 8), 100, stat=np.min)

    comm.Barrier()
    alpha = latency(link)
    vals = [alpha]
    for nb in (SMALL, LARGE):  # beta: bytes moved each way in a simultaneous exchange
        comm.Barrier()
        vals.append(max(1e-13, (timed(xchg(link, nb), 8 if nb == SMALL else 1) - alpha) / nb)
                    if link.Get_size() > 1 else 1e-12)
        comm.Barrier()
        vals.append(timed(reduce(nb), 8 if nb == SMALL else 1) / nb)
    native_sizes = NATIVE_SIZES
    for nb in native_sizes:
        x = np.ones(nb // 4, np.float32)
        comm.Barrier()
        vals.append(timed(lambda: comm.Allreduce(MPI.IN_PLACE, x, op=MPI.SUM), 20 if nb < 1 << 18 else 1,
                           stat=np.min if nb < 1 << 16 else np.median))
    inter = [0.0, 0.0]
    if multi:  # every slice at once (uniform nodes), else the leaders only
        sl = t.slice_comm if (t.uniform or t.local_rank == 0) else MPI.COMM_SELF
        comm.Barrier()
        a_net = latency(sl)
        comm.Barrier()
        nb = NET_BYTES
        tb = timed(xchg(sl, nb), 2) if sl.Get_size() > 1 else 0.0
        share = t.sizes[0] if t.uniform else 1
        inter = [a_net if sl.Get_size() > 1 else 0.0, max(1e-13, (tb - a_net) / (nb * share)) if tb else 0.0]
    vals += inter
    tiny = np.ones(2, np.float32)
    # not the algorithms this communicator cannot run (infinite cost: shm across nodes) - decided
    # from the agreed topology, so every rank skips the same ones
    probe = CostParams(comm.Get_size(), hosts=t.nodes if t is not None else 1, layout=t.layout if t is not None else "")
    names = [a for a in ALLREDUCE.costs if a == "mpi" or math.isfinite(ALLREDUCE.costs[a][0](probe, 8))]
    for name in names:  # o: the fixed cost of one call with next to no data
        fn = ALLREDUCE.resolve(name)
        comm.Barrier()
        vals.append(timed(lambda: fn(comm, tiny, SUM), 30, stat=np.min))
    v = np.array(vals)
    comm.Allreduce(MPI.IN_PLACE, v, op=MPI.MAX)  # the slowest rank decides a collective's time
    nnat = len(native_sizes)
    c = CostParams(comm.Get_size(), float(v[0]), float(v[1]), float(v[2]), float(v[3]), float(v[4]),
                   native=[(nb, float(t)) for nb, t in zip(native_sizes, v[5:5 + nnat])], source="measured",
                   alpha_inter=float(v[5 + nnat]), beta_inter=float(v[6 + nnat]))
    if t is not None:
        c.hosts, c.layout, c.crossings = t.nodes, t.layout, t.crossings
    o = v[7 + nnat:]
    base = {name: predict(replace(c, overhead={name: 0.0}), name, 8) for name in names if name != "mpi"}
    c.overhead = {name: max(0.0, float(t) - base[name]) if math.isfinite(base.get(name, math.inf)) else 0.0
                  for name, t in zip(names, o)}
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
    g = as_group(group)
    # the set-up check first: a rank that calibrates alone would wait in measure()'s untracked
    # Barrier for good while its peers wait in their next call (attack9); now every rank raises
    validate.check(g.comm, "calibrate", {}, None, always=True)
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


def cache_file(comm, hosts: int | None = None, layout: str = "") -> str:
    """Per-user cache, keyed by ranks, hosts and ranks per host: 4 ranks on one node, on 2 x 2 and
    on 3 + 1 are different machines. Collective unless `hosts` is given or `comm`'s topology
    (comm/topology.py) was recorded."""
    t = topology.of(comm)
    if hosts is None:
        hosts, layout = (t.nodes, t.layout) if t is not None else (count_hosts(comm), "")
    root = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    tail = f"-{layout}" if layout and hosts > 1 else ""
    return os.path.join(root, "disttrain", f"costmodel-p{comm.Get_size()}-hosts{hosts}{tail}.json")


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
    inter = [c.alpha_inter, c.beta_inter]
    if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in inter):
        raise ValueError(f"alpha_inter/beta_inter must be finite non-negative numbers (0: not measured), got {inter}")
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
    # group rank 0's setting decides for everyone: an environment that differs on one host must
    # not send ranks into different collectives below
    spec = comm.bcast(config.current().costmodel_file, root=0)
    t = topology.of(comm)
    hosts, layout, crossings = (t.nodes, t.layout, t.crossings) if t is not None else (count_hosts(comm), "", 1)
    if spec == "measure":
        c = measure(comm)
        c.hosts, c.layout, c.crossings = hosts, layout, crossings
        install(c, comm, *also)
        return c
    path = spec if spec not in ("", "defaults") else (cache_file(comm, hosts, layout) if spec == "" else "")
    res = _read(path, comm.Get_size(), explicit=bool(spec)) if (comm.Get_rank() == 0 and path) else (None, None, False)
    loaded, msg, fatal = comm.bcast(res, root=0)
    if fatal:
        raise CollectiveError(msg)
    if msg and comm.Get_rank() == 0:
        logger.warning(msg)
    c = CostParams(**loaded) if loaded else CostParams(comm.Get_size())
    # the topology is a fact of this communicator, whatever file the numbers came from
    c.hosts, c.layout, c.crossings = hosts, layout, crossings
    install(c, comm, *also)
    return c


def count_hosts(comm) -> int:
    """Nodes (shared-memory domains) the communicator spans - the same answer on every rank
    (from its recorded topology, which DISTTRAIN_FAKE_NODES may split further; else collective)."""
    t = topology.of(comm)
    if t is not None:
        return t.nodes
    node = comm.Split_type(mpi.MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        return comm.allreduce(1 if node.Get_rank() == 0 else 0)
    finally:
        node.Free()


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
        best = min(ALLREDUCE.costs, key=lambda a: predict(c, a, nbytes))
        margin = SWITCH_MARGIN if nbytes < LATENCY_BOUND else 1.0
        return best if predict(c, best, nbytes) * margin < predict(c, "mpi", nbytes) else "mpi"
    if family in ("reduce_scatter", "allgather"):
        # Measured side by side (MPICH 4 wheel, this 2-core host, 2 and 4 ranks, lowlevel
        # reduce_scatter_on / in-place allgather_on): the library's MPI_Reduce_scatter and in-place
        # MPI_Allgatherv take 3-12x our ring's time from 1 MiB on (16 MiB, p=4: 29 vs 12 ms and
        # 1168 vs 13 ms), while below ~64 KiB its latency wins. Half a ring allreduce vs half the
        # library's *allreduce* (the model before) picked the library there, so ZeRO's buckets ran
        # slow. Until calibrate() measures these two families, the bandwidth-bound rule is ring.
        # Across hosts the same holds (bench_hier on the emulated cluster, 2x2 and 3x2: at 64 KiB
        # the library's allgather / reduce-scatter took 0.16-0.33x our ring's and hier's time), so
        # the two-level algorithms are weighed against the ring from LATENCY_BOUND on only.
        if nbytes < LATENCY_BOUND:
            return "mpi"
        return _or_hier(_FAMILIES[family], c, "ring", nbytes)
    if family == "alltoall":  # the formulas registered in alltoall.py / hier_alltoall.py know the nodes
        flat = min((a for a in ALLTOALL.costs if a != "hier"), key=lambda a: family_cost(ALLTOALL, c, a, nbytes))
        return _or_hier(ALLTOALL, c, flat, nbytes)
    return "mpi"  # broadcast: the library's version is at least as good here


_FAMILIES = {"reduce_scatter": REDUCE_SCATTER, "allgather": ALLGATHER}
#: families whose flat formulas assume one node: on several they are costed at port speed (cost.across)
_PORT_BLIND = ("reduce_scatter", "allgather")


def family_cost(reg, c: CostParams, name: str, nbytes: float) -> float:
    """Predicted seconds of `name` in family `reg` (not allreduce: see predict). The library ("mpi")
    has no formula in these families - MPICH picks among its own algorithms - and is costed as
    the ring (on several nodes with a non-ring pattern's port sharing)."""
    formula, o = reg.costs.get(name) or (reg.costs["ring"][0], 1.5e-6)
    if c.hosts > 1 and name != "hier" and reg.family in _PORT_BLIND:
        c = across(c, ring_order=name == "ring")
    return o + formula(c, nbytes)


def _or_hier(reg, c: CostParams, flat: str, nbytes: int) -> str:
    """`flat`, or the family's two-level algorithm where its formula beats the flat one's - only
    on several nodes (its cost is infinite on one), by SWITCH_MARGIN for latency-bound sizes."""
    if c.hosts <= 1 or "hier" not in reg.costs:
        return flat
    margin = SWITCH_MARGIN if nbytes < LATENCY_BOUND else 1.0
    return "hier" if family_cost(reg, c, "hier", nbytes) * margin < family_cost(reg, c, flat, nbytes) else flat


def agreed_bytes(comm, nbytes: int) -> int:
    """The largest `nbytes` over the ranks of `comm` (collective): what "auto" sizes an alltoallv
    by, so that ranks sending different amounts still pick the same algorithm."""
    if comm.Get_size() == 1:
        return nbytes
    v = np.array([nbytes], np.int64)
    comm.Allreduce(mpi.MPI.IN_PLACE, v, op=mpi.MPI.MAX)
    return int(v[0])
