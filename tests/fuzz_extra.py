"""The schedule fuzzer's second half (tests/fuzz_program.py draws it): the MPI library as a second
oracle, the public API's remaining shapes and dtypes, groups and sub-meshes made between
asynchronous calls, and the argument faults of every family.

- Oracle: every collective is run a second time through the MPI library on a private duplicate
  of the group's communicator (`Pool.ref`) - MPI_Allreduce / Reduce_scatter / Allgatherv /
  Alltoallv / Bcast - and disttrain's result must equal it (and NumPy's). Not where MPI is not an
  oracle: float16 reductions (no MPI type) and min/max over floats with NaN (MPICH's MIN is
  `a < b ? a : b`, so a NaN's fate depends on the order; NumPy's oracle still checks those).
- Shapes: 0-d arrays, rows with 0-3 trailing elements (rows of zero bytes), every dtype for
  allgather(v), alltoall(v) (also splits=None over non-divisible rows) and broadcast(_).
- Groups: `dt.new_group` of a random same-size subset while asynchronous calls on other groups are
  in flight, used at once asynchronously and freed before or after its handle is waited; a
  `dt.Mesh` over a pool group (a sub-mesh: its tp/pp/dp groups split from that group).
- Faults (each must raise CollectiveError on every member): another root, another algorithm,
  splits that do not sum to the rows, other trailing dims for allgather, another shape for
  reduce_scatter and broadcast, another op for reduce_scatter.
"""
import numpy as np
from mpi4py import MPI

import disttrain as dt

DTYPES = [np.int32, np.int64, np.float32, np.float64, np.float16]
MPI_OPS = {"sum": MPI.SUM, "avg": MPI.SUM, "prod": MPI.PROD, "min": MPI.MIN, "max": MPI.MAX}
KINDS = ["scalar", "gather2", "a2a2", "bcast2", "newgroup", "mesh", "fault2"]
FAULTS = ["root", "alg", "splits", "trailing", "rs_shape", "bcast_shape", "rs_op"]


def finish_avg(acc, dtype, p):
    """avg from a sum, as the library finishes it: true division in the accumulation dtype for
    floats (float16 -> float32), floor division for integers."""
    if np.dtype(dtype).kind == "f":
        wide = np.dtype(np.float32 if np.dtype(dtype) == np.float16 else dtype).type
        return (acc.astype(wide) / wide(p)).astype(dtype)
    return (acc // p).astype(dtype)


def mpi_oracle_ok(dtype, op, xs):
    return np.dtype(dtype) != np.float16 and not (
        np.dtype(dtype).kind == "f" and op in ("min", "max") and any(np.isnan(x).any() for x in xs))


def mpi_allreduce(comm, x, op):
    x = np.array(x, order="C")  # not ascontiguousarray: it makes a 0-d array 1-d
    out = np.empty_like(x)
    comm.Allreduce(x, out, op=MPI_OPS[op])
    return finish_avg(out, x.dtype, comm.Get_size()) if op == "avg" else out


def mpi_reduce_scatter(comm, x, op):
    x = np.ascontiguousarray(x)
    p, r = comm.Get_size(), comm.Get_rank()
    rows = [len(b) for b in np.array_split(np.arange(x.shape[0]), p)]
    per = int(np.prod(x.shape[1:], dtype=np.int64))
    out = np.empty((rows[r],) + x.shape[1:], x.dtype)
    comm.Reduce_scatter(x, out, [n * per for n in rows], op=MPI_OPS[op])
    return finish_avg(out, x.dtype, p) if op == "avg" else out


def _bytes(x):
    return np.ascontiguousarray(x).reshape(-1).view(np.uint8)


def mpi_allgather(comm, x):
    rows = comm.allgather(x.shape[0])
    per = int(np.prod(x.shape[1:], dtype=np.int64)) * x.itemsize
    out = np.empty((sum(rows),) + x.shape[1:], x.dtype)
    counts = [n * per for n in rows]
    comm.Allgatherv(_bytes(x), [out.reshape(-1).view(np.uint8), (counts, np.cumsum([0] + counts[:-1]).tolist()),
                                MPI.BYTE])
    return out


def mpi_alltoall(comm, x, splits):
    per = int(np.prod(x.shape[1:], dtype=np.int64)) * x.itemsize
    rc = comm.alltoall(list(splits))
    out = np.empty((sum(rc),) + x.shape[1:], x.dtype)
    sc, rcb = [n * per for n in splits], [n * per for n in rc]
    comm.Alltoallv([_bytes(x), (sc, np.cumsum([0] + sc[:-1]).tolist()), MPI.BYTE],
                   [out.reshape(-1).view(np.uint8), (rcb, np.cumsum([0] + rcb[:-1]).tolist()), MPI.BYTE])
    return out, rc


def mpi_bcast(comm, x, root):
    out = np.ascontiguousarray(x).copy()
    comm.Bcast(out.reshape(-1).view(np.uint8), root=root)
    return out


def factor3(n, rng):
    """A random (dp, pp, tp) with dp * pp * tp == n."""
    divs = [d for d in range(1, n + 1) if n % d == 0]
    tp = int(rng.choice(divs))
    rest = n // tp
    pp = int(rng.choice([d for d in range(1, rest + 1) if rest % d == 0]))
    return rest // pp, pp, tp


class Extra:
    """The extra kinds for one Fuzzer (fz): fz.pool, fz.refs (MPI duplicates), fz.check, fz.fail."""

    def __init__(self, fz):
        self.fz = fz

    def data(self, prog, i, m, shape, dtype):
        g = np.random.default_rng([self.fz.seed, prog, i, m, 7])
        if np.dtype(dtype).kind == "f":
            x = g.integers(-4, 5, size=shape).astype(dtype)
            x[g.random(shape) < 0.05] = np.nan
            return x
        return g.integers(-50, 50, size=shape).astype(dtype)

    def run(self, prog, i, kind, gi, rng, outstanding):
        """One extra operation. Every draw is made on every rank (members or not)."""
        fz = self.fz
        g = fz.pool[gi]
        dtype = DTYPES[int(rng.integers(len(DTYPES)))]
        op = str(rng.choice(["sum", "avg", "prod", "min", "max"]))
        tail = (int(rng.integers(0, 4)),) if rng.random() < 0.6 else ()
        rows = [int(v) for v in rng.integers(0, 5, size=g.size)]
        root = int(rng.integers(g.size))
        alg = {f: str(rng.choice(fz.algs[f])) for f in ("allreduce", "allgather", "alltoall", "broadcast",
                                                           "reduce_scatter")}
        inplace, blocking, free_early = bool(rng.random() < 0.5), bool(rng.random() < 0.5), bool(rng.random() < 0.5)
        fault = (int(rng.integers(g.size)), str(rng.choice(FAULTS)))
        spec = tuple(sorted(rng.choice(fz.p, size=int(rng.integers(1, fz.p + 1)), replace=False).tolist()))
        mesh_dims = factor3(g.size, rng)
        axis = str(rng.choice(["tp_group", "pp_group", "dp_group"]))
        equal = bool(rng.random() < 0.3)
        if kind == "newgroup":  # collective over the world, with async calls on other groups in flight
            return self.newgroup(prog, i, spec, dtype, op, alg["allreduce"], free_early, outstanding)
        if gi in fz.dead or not g.is_member:
            return
        if kind == "fault2":
            if fz.validate and g.size >= 2:
                self.fault(prog, i, g, *fault, alg, dtype)
            return
        fz.calls += 1
        members, me = g.ranks, g.rank
        ref = fz.refs[gi]
        if kind == "scalar":  # 0-d arrays: allreduce (in place or not) and broadcast
            if op == "prod" or np.dtype(dtype).kind == "i":
                op = "sum" if op == "prod" else op
            xs = [self.data(prog, i, m, (), dtype) for m in members]
            want = fz.expected(xs, op)
            if inplace:
                mine = xs[me].copy()
                dt.allreduce_(mine, op=op, algorithm=alg["allreduce"], group=g)
            else:
                mine = dt.allreduce(xs[me], op=op, algorithm=alg["allreduce"], group=g)
            what = f"0-d allreduce {op} {alg['allreduce']} {np.dtype(dtype)} inplace={inplace} on {members}"
            fz.check(prog, mine, want, what)
            if mpi_oracle_ok(dtype, op, xs):
                fz.check(prog, mine, mpi_allreduce(ref, xs[me], op), what + " (vs MPI)")
            y = dt.broadcast(xs[me], root=root, algorithm=alg["broadcast"], group=g)
            fz.check(prog, y, xs[root], f"0-d broadcast root {root} on {members}")
        elif kind == "gather2":
            xs = [self.data(prog, i, m, (rows[k],) + tail, dtype) for k, m in enumerate(members)]
            got = dt.allgather(xs[me], algorithm=alg["allgather"], group=g)
            what = f"allgather {alg['allgather']} {np.dtype(dtype)} rows {rows} tail {tail} on {members}"
            fz.check(prog, got, np.concatenate(xs), what)
            fz.check(prog, got, mpi_allgather(ref, xs[me]), what + " (vs MPI)")
            n = sum(rows)
            rs = [self.data(prog, i, m, (n,) + tail, dtype) for m in members]
            if op == "prod":
                rs = [np.clip(x, -2, 2) for x in rs]
            got = dt.reduce_scatter(rs[me], op, algorithm=alg["reduce_scatter"], group=g)
            what = f"reduce_scatter {op} {alg['reduce_scatter']} {np.dtype(dtype)} shape {rs[0].shape} on {members}"
            fz.check(prog, got, np.array_split(fz.expected(rs, op), g.size)[me], what)
            if mpi_oracle_ok(dtype, op, rs):
                fz.check(prog, got, mpi_reduce_scatter(ref, rs[me], op), what + " (vs MPI)")
        elif kind == "a2a2":
            n = rows[me] * g.size + (0 if equal else me % 2)
            x = self.data(prog, i, members[me], (n,) + tail, dtype)
            splits = None if equal or rng.random() < 0.5 else [len(b) for b in np.array_split(np.arange(n), g.size)]
            mine = [len(b) for b in np.array_split(np.arange(n), g.size)]
            y, rc = dt.alltoall(x, splits, algorithm=alg["alltoall"], group=g)
            want, wrc = mpi_alltoall(ref, x, mine)
            what = f"alltoall {alg['alltoall']} {np.dtype(dtype)} splits={splits} n={n} tail {tail} on {members}"
            fz.check(prog, y, want, what + " (vs MPI)")
            if list(rc) != list(wrc):
                fz.fail(prog, f"{what}: recv_splits {rc} != {wrc}")
        elif kind == "bcast2":
            shape = (rows[0] + 1,) + tail
            x = self.data(prog, i, members[me], shape, dtype)
            want = self.data(prog, i, members[root], shape, dtype)
            if inplace:
                y = x if rng.random() < 0.5 else np.zeros(shape + (2,), dtype)[..., 0]  # strided in place
                y[...] = x
                got = dt.broadcast_(y, root=root, algorithm=alg["broadcast"], group=g)
                if got is not y:
                    fz.fail(prog, "broadcast_ did not return its argument")
            else:
                got = dt.broadcast(x, root=root, algorithm=alg["broadcast"], group=g)
            what = f"broadcast inplace={inplace} {alg['broadcast']} {np.dtype(dtype)} {shape} root {root} on {members}"
            fz.check(prog, got, want, what)
            fz.check(prog, got, mpi_bcast(ref, x, root), what + " (vs MPI)")
        elif kind == "mesh":
            self.mesh(prog, i, g, mesh_dims, axis, dtype, op, blocking, outstanding)

    def newgroup(self, prog, i, spec, dtype, op, alg, free_early, outstanding):
        fz = self.fz
        g = dt.new_group(spec)  # every rank, while its async calls on other groups may be in flight
        if not g.is_member:
            return
        fz.calls += 1
        if op == "prod":
            op = "sum"
        xs = [self.data(prog, i, m, (7,), dtype) for m in spec]
        h = dt.allreduce_async(xs[g.rank], op=op, algorithm=alg, group=g)
        what = f"allreduce_async {op} {alg} {np.dtype(dtype)} on a new group {list(spec)} (freed early: {free_early})"
        if free_early:
            g.free()  # with its handle still out: the free must queue behind it
            outstanding.append((h, fz.expected(xs, op), what))
        else:
            fz.check(prog, h.wait(), fz.expected(xs, op), what)
            g.free()

    def mesh(self, prog, i, g, dims, axis, dtype, op, blocking, outstanding):
        fz = self.fz
        m = dt.Mesh(*dims, group=g)
        sub = getattr(m, axis)
        if op == "prod":
            op = "max"
        xs = [self.data(prog, i, r, (5,), dtype) for r in sub.ranks]
        what = f"allreduce {op} {np.dtype(dtype)} on the {axis} {list(sub.ranks)} of a mesh {dims} over {list(g.ranks)}"
        if blocking:
            fz.check(prog, dt.allreduce(xs[sub.rank], op=op, group=sub), fz.expected(xs, op), what)
            m.free()
        else:
            outstanding.append((dt.allreduce_async(xs[sub.rank], op=op, group=sub), fz.expected(xs, op), "async " + what))
            m.free()

    def fault(self, prog, i, g, bad, how, alg, dtype):
        """Group rank `bad` passes one argument unlike its peers: CollectiveError on every member."""
        fz = self.fz
        fz.faults += 1
        me_bad = g.rank == bad
        x = np.arange(6, dtype=dtype).reshape(3, 2)
        try:
            if how == "root":
                dt.broadcast(x, root=(bad + 1) % g.size if me_bad else bad, group=g)
            elif how == "alg":
                names = fz.algs["allreduce"]
                a = alg["allreduce"]
                dt.allreduce(x, algorithm=names[(names.index(a) + 1) % len(names)] if me_bad else a, group=g)
            elif how == "splits":
                # the bad rank's splits sum to 4 rows of its 3: a local error that every member must see
                dt.alltoall(x, [4 if me_bad else 3] + [0] * (g.size - 1), algorithm=alg["alltoall"], group=g)
            elif how == "trailing":
                dt.allgather(x.reshape(2, 3) if me_bad else x, algorithm=alg["allgather"], group=g)
            elif how == "rs_shape":
                dt.reduce_scatter(x.reshape(2, 3) if me_bad else x, algorithm=alg["reduce_scatter"], group=g)
            elif how == "bcast_shape":
                dt.broadcast(x[:2] if me_bad else x, root=0, algorithm=alg["broadcast"], group=g)
            elif how == "rs_op":
                dt.reduce_scatter(x, "max" if me_bad else "sum", group=g)
            fz.fail(prog, f"fault {how} by group rank {bad} on {g.ranks}: no error on rank {fz.r}")
        except dt.CollectiveError:
            pass
