"""Schedule fuzzer: random collective programs on random, overlapping groups, run on every rank.

    mpiexec -n P python tests/fuzz_program.py SEED PROGRAMS [--fatal exit|raise|skip] [--extra RATE]

Every rank draws the same program from SEED (so they agree on what to call, as a real program
would), runs it, and checks:
- each result equals the NumPy reduction of every member's input (integer data: exact, the MPI
  library's answer) and is bit-identical on every member (floats: min/max, NaN included);
- an injected fault (one rank passes a different shape or dtype, the same elements in another
  shape, a bad op, or a bad group=) ends in a CollectiveError on every member of that collective,
  never a hang and never a result;
- blocking and asynchronous calls interleave, settings (validation, segment size) change between
  calls while handles are outstanding, groups are created and freed between programs;
- allreduces take every op on floats too (sum/prod/avg over small integers are exact, so the
  fused hot path is checked bit for bit), float16, in-place calls, strided and read-only inputs
  (which must come back unchanged); allgather, reduce-scatter (every dtype and op, 1-D and rows)
  and broadcast run every registered algorithm by name, so the two-level ones run on emulated
  nodes (auto keeps the library at these sizes).
With --fatal one rank leaves at a random point (sys.exit, an uncaught exception): the job must
end promptly with a message naming it (the driver checks that). Prints one line per failure with
the seed and program number, and a summary line "fuzz: N programs, M collectives, K faults".
"""
import sys

import numpy as np

import disttrain as dt
from disttrain.comm import config, kernels
from disttrain.comm.ops import MAX, MIN
from disttrain.comm.registry import ALLGATHER, BROADCAST, REDUCE_SCATTER

from fuzz_extra import KINDS as EXTRA_KINDS, Extra

ALGS = {"allreduce": ["auto", *dt.ALLREDUCE_ALGORITHMS], "alltoall": ["auto", *dt.ALLTOALL_ALGORITHMS],
        "allgather": ["auto", *ALLGATHER.names()], "reduce_scatter": ["auto", *REDUCE_SCATTER.names()],
        "broadcast": ["auto", *BROADCAST.names()]}
SIZES = [0, 1, 2, 3, 5, 17, 64, 1000, 4099]
EXTRA_RATE = 0.25  # share of operations drawn from fuzz_extra (the MPI oracle, groups made mid-program, ...): --extra


def make_pool(p, rng):
    """Groups: the world, a dup of it, and overlapping subsets of equal sizes (same on every rank)."""
    specs = [tuple(range(p)), tuple(range(p))[::-1]]
    for k in range(2, p):
        for _ in range(2):
            specs.append(tuple(sorted(rng.choice(p, size=k, replace=False).tolist())))
    return [dt.new_group(s) for s in specs]


def rank_data(seed, prog, i, r, n, dtype, rows=None):
    g = np.random.default_rng([seed, prog, i, r])
    shape = (n,) if rows is None else (rows, 3)
    if np.dtype(dtype).kind == "f":
        x = g.integers(-4, 5, size=shape).astype(dtype)
        x[g.random(shape) < 0.05] = np.nan
        x[g.random(shape) < 0.1] = -0.0
        return x
    return g.integers(-50, 50, size=shape).astype(dtype)


def expected_reduce(xs, op):
    acc = xs[0].astype(np.float64) if xs[0].dtype.kind == "f" else xs[0].copy()
    for x in xs[1:]:
        if op == "sum" or op == "avg":
            acc = acc + x
        elif op == "prod":
            acc = acc * x
        else:
            acc = kernels.minmax_ref(acc, x.astype(acc.dtype), MIN if op == "min" else MAX) if acc.dtype.kind == "f" \
                else (np.minimum if op == "min" else np.maximum)(acc, x)
    if op == "avg" and acc.dtype.kind == "f":
        # the data are small integers: the float64 sum is exact in every dtype; the library sums in
        # the accumulation dtype (float16 -> float32) and divides there (true division, as NumPy)
        wide = np.dtype(np.float32 if xs[0].dtype == np.float16 else xs[0].dtype).type
        return (acc.astype(wide) / wide(len(xs))).astype(xs[0].dtype)
    if op == "avg":
        acc = acc // len(xs)
    return acc.astype(xs[0].dtype)


def layout(x, how):
    """x as the caller hands it over: plain, a strided view, read-only, or (for the in-place call)
    a writeable copy."""
    if how == "strided":
        big = np.zeros(x.shape + (2,), x.dtype)
        big[..., 0] = x
        return big[..., 0]
    if how == "readonly":
        x = x.copy()
        x.flags.writeable = False
        return x
    return x.copy()


def same_bits(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


class Fuzzer:
    def __init__(self, seed):
        self.seed, self.r, self.p = seed, dt.rank(), dt.size()
        self.pool = make_pool(self.p, np.random.default_rng([seed, 999]))
        # a private duplicate of each group's communicator: the MPI library's own collectives there
        # are fuzz_extra's second oracle
        self.refs = [g.comm.Dup() if g.is_member else None for g in self.pool]
        self.failures, self.calls, self.faults = [], 0, 0
        self.dead = set()  # pool indices of groups made unusable by a bad-group fault
        self.algs, self.expected, self.validate = ALGS, expected_reduce, True
        self.extra, self.extra_rate = Extra(self), EXTRA_RATE
        self.skip_prog = None  # --fatal skip: this rank leaves out its first collective of that program

    def replace(self, k):
        """A new group with pool group k's ranks (collective over the world), and its MPI duplicate."""
        old, ref = self.pool[k], self.refs[k]
        self.pool[k] = dt.new_group(old.ranks)
        self.refs[k] = self.pool[k].comm.Dup() if self.pool[k].is_member else None
        if ref is not None:
            ref.Free()
        return old

    def fail(self, prog, msg):
        self.failures.append(f"seed={self.seed} program={prog}: {msg}")

    def program(self, prog):
        rng = np.random.default_rng([self.seed, prog])
        outstanding = []  # (handle, expected, what[, pool index of its group])
        self.validate = True
        for i in range(int(rng.integers(3, 12))):
            # Every random choice is drawn on every rank, member or not, so all ranks keep drawing
            # the same program.
            kind = str(rng.choice(["allreduce", "allreduce", "async", "broadcast", "allgather", "reduce_scatter",
                                   "alltoall", "settings", "fault"]))
            gi = int(rng.integers(len(self.pool)))
            g = self.pool[gi]
            n = int(rng.choice(SIZES))
            dtype = [np.int32, np.int64, np.float32, np.float64][int(rng.integers(4))]
            op = str(rng.choice(["sum", "min", "max", "prod", "avg"] if np.dtype(dtype).kind == "i" else ["min", "max"]))
            alg = str(rng.choice(ALGS["allreduce"]))
            a2a_alg = str(rng.choice(ALGS["alltoall"]))
            root = int(rng.integers(g.size))
            rows = [int(v) for v in rng.integers(0, 4, size=g.size)]
            splits = rng.integers(0, 4, size=(g.size, g.size))  # splits[src][dst] rows
            new_validate = bool(rng.random() < 0.7)
            seg = int(rng.choice([1024, 8192, 1 << 21]))
            fault = (int(rng.integers(g.size)), str(rng.choice(["shape", "op", "group"] if rng.random() < 0.1
                                                               else ["shape", "op"])), bool(rng.random() < 0.5))
            waitnow = bool(rng.random() < 0.4)
            pick = float(rng.random())
            # drawn from their own stream, so that the draws above (and old seeds' programs) stay put:
            # float sum/prod/avg (the fused hot path), float16, and how the caller hands x over
            more = np.random.default_rng([self.seed, prog, i, 1])
            if np.dtype(dtype).kind == "f" and more.random() < 0.6:
                op = str(more.choice(["sum", "prod", "avg"]))
            if more.random() < 0.15:
                dtype = np.float16
            how = str(more.choice(["plain", "plain", "strided", "readonly", "inplace"]))
            # the other families' algorithms by name too (auto keeps the library at these sizes, so
            # the two-level ones would never run), and reduce-scatter over every dtype and op
            ag_alg, rs_alg, bc_alg = (str(more.choice(ALGS[f])) for f in ("allgather", "reduce_scatter", "broadcast"))
            rs_dtype = [np.int64, np.int32, np.float32, np.float64, np.float16][int(more.integers(5))]
            rs_op = str(more.choice(["sum", "avg", "prod", "min", "max"]))
            rs_rows = bool(more.random() < 0.5)
            if fault[1] == "shape" and more.random() < 0.4:  # the same shape in another dtype: two typed
                fault = (fault[0], "dtype", fault[2])       # views of the fused slots meet in one round
            # drawn last (earlier seeds' draws stay put): allreduce inputs as rows (the shape enters
            # the round's hash: fused.shape_hash), and a shape fault with the same elements in
            # another shape - (2, 3), (3, 2) or (6, 1) against (6,): the same bytes in every slot
            rows2d = bool(more.random() < 0.3)
            if fault[1] == "shape" and more.random() < 0.3:
                fault = (fault[0], "reshape", fault[2])
            x7 = np.random.default_rng([self.seed, prog, i, 2])  # its own stream: the draws above stay put
            if x7.random() < self.extra_rate and kind != "settings":
                self.extra.run(prog, i, str(x7.choice(EXTRA_KINDS)), gi, x7, outstanding)
                continue
            if kind == "settings":
                self.validate = new_validate
                dt.set_validation(new_validate)
                config.update(segment_bytes=seg)
                continue
            if gi in self.dead:  # its peers abandoned a call after a bad group=: unusable until replaced
                continue
            if kind == "fault":
                if self.validate and g.size >= 2:
                    self.fault(prog, g, gi, *fault)
                continue
            if not g.is_member:
                continue
            members = g.ranks
            if self.skip_prog is not None and prog >= self.skip_prog:  # --fatal skip: one call its peers make
                self.skip_prog = None
                print(f"FUZZ-SKIPPED rank {self.r}: {kind} on {list(members)} in program {prog}", flush=True)
                continue
            self.calls += 1
            if kind in ("allreduce", "async"):
                xs = [rank_data(self.seed, prog, i, m, n, dtype) for m in members]
                if rows2d and n % 2 == 0:
                    xs = [x.reshape(n // 2, 2) for x in xs]
                if op == "prod":
                    xs = [np.clip(x, -2, 2) for x in xs]
                want = expected_reduce(xs, op)
                mine = layout(xs[g.rank], "plain" if how == "inplace" else how)
                what = f"{op} {alg} n={n} {np.dtype(dtype)} {how} on {members}"
                if kind == "async":
                    call = dt.allreduce_async_ if how == "inplace" else dt.allreduce_async
                    outstanding.append((call(mine, op=op, algorithm=alg, group=g), want, f"allreduce_async {what}", gi))
                elif how == "inplace":
                    got = dt.allreduce_(mine, op=op, algorithm=alg, group=g)
                    if got is not mine:
                        self.fail(prog, f"allreduce_ {what}: did not return its argument")
                    self.check(prog, mine, want, f"allreduce_ {what}")
                else:
                    before = mine.copy()
                    self.check(prog, dt.allreduce(mine, op=op, algorithm=alg, group=g), want, f"allreduce {what}")
                    if not same_bits(mine, before):
                        self.fail(prog, f"allreduce {what}: changed its input")
            elif kind == "broadcast":
                xs = rank_data(self.seed, prog, i, members[root], n, np.int64)
                mine = rank_data(self.seed, prog, i, self.r, n, np.int64)
                self.check(prog, dt.broadcast(mine, root=root, algorithm=bc_alg, group=g), xs,
                           f"broadcast {bc_alg} root {root} on {members}")
            elif kind == "allgather":
                xs = [rank_data(self.seed, prog, i, m, 0, np.int32, rows=rows[k]) for k, m in enumerate(members)]
                self.check(prog, dt.allgather(xs[g.rank], algorithm=ag_alg, group=g), np.concatenate(xs),
                           f"allgather {ag_alg} rows {rows} on {members}")
            elif kind == "reduce_scatter":
                xs = [rank_data(self.seed, prog, i, m, n, rs_dtype, rows=n % 7 if rs_rows else None) for m in members]
                if rs_op == "prod":
                    xs = [np.clip(x, -2, 2) for x in xs]
                want = np.array_split(expected_reduce(xs, rs_op), g.size)[g.rank]
                self.check(prog, dt.reduce_scatter(xs[g.rank], rs_op, algorithm=rs_alg, group=g), want,
                           f"reduce_scatter {rs_op} {rs_alg} {np.dtype(rs_dtype)} shape {xs[0].shape} on {members}")
            elif kind == "alltoall":
                xs = [rank_data(self.seed, prog, i, m, 0, np.int64, rows=int(splits[k].sum()))
                      for k, m in enumerate(members)]
                want = np.concatenate([np.split(xs[s], np.cumsum(splits[s])[:-1])[g.rank] for s in range(g.size)])
                y, rc = dt.alltoall(xs[g.rank], splits=splits[g.rank].tolist(), algorithm=a2a_alg, group=g)
                self.check(prog, y, want, f"alltoall {a2a_alg} on {members}")
                if list(rc) != splits[:, g.rank].tolist():
                    self.fail(prog, f"alltoall recv_splits {rc}")
            if outstanding and waitnow:
                self.finish(prog, *outstanding.pop(int(pick * len(outstanding))))
        for entry in outstanding:
            self.finish(prog, *entry)
        dt.set_validation(True)
        # every program ends with the same digest of its results on every rank
        if rng.random() < 0.2:  # groups are created and freed between programs
            k = int(rng.integers(1, len(self.pool)))
            if k not in self.dead:
                self.replace(k).free()

    def finish(self, prog, h, want, what, gi=None):
        """Wait for an asynchronous call and check its result. A bad-group fault on its group
        while it was in flight makes the group unusable (stall.mark_broken, when a peer's wait is
        interrupted by the notice): the call may then raise CollectiveError instead."""
        try:
            got = h.wait()
        except dt.CollectiveError as e:
            if gi in self.dead and "unusable after an abandoned collective" in str(e):
                return
            raise
        self.check(prog, got, want, what)

    def check(self, prog, got, want, what):
        if got.dtype.kind == "f":
            ok = np.array_equal(np.isnan(got), np.isnan(want)) and np.array_equal(
                np.nan_to_num(got), np.nan_to_num(want)) and np.array_equal(np.signbit(got), np.signbit(want))
        else:
            ok = same_bits(got, want)
        if not ok:
            self.fail(prog, f"{what}: wrong result {got!r} != {want!r}")

    def fault(self, prog, g, gi, bad, how, blocking):
        """Group rank `bad` of g calls with a bad argument; every member must raise CollectiveError."""
        if how == "group":
            self.dead.add(gi)  # every rank knows: the fault was drawn everywhere
        if not g.is_member:
            return
        self.faults += 1
        me_bad = g.rank == bad
        x = np.ones(5 + (me_bad and how == "shape"), np.float64 if me_bad and how == "dtype" else np.int64)
        if how == "reshape":
            x = np.ones([(2, 3), (3, 2), (6, 1)][bad % 3] if me_bad else (6,), np.int64)
        op = "bogus" if me_bad and how == "op" else "sum"
        try:
            if how == "group":
                # A rank whose group= is not a Group cannot say which group its call was for: its
                # notice interrupts a wait for the same collective, shape, dtype and line
                # (stall.UNKNOWN_GROUP_TTL). Called from the line of the shape/op faults, a member
                # of the NEXT fault's group that skipped this one would take the notice for that
                # call and the job would end (documented in docs/ARCHITECTURE.md sec. 7): its own line.
                grp = "not-a-group" if me_bad else g
                if blocking:
                    dt.allreduce(x[:4], group=grp)
                else:
                    dt.allreduce_async(x[:4], group=grp).wait()
            elif blocking:
                dt.allreduce(x, op=op, group=g)
            else:
                dt.allreduce_async(x, op=op, group=g).wait()
            self.fail(prog, f"fault {how} by group rank {bad} on {g.ranks}: no error on rank {self.r}")
        except dt.CollectiveError:
            pass

    def run(self, programs):
        for prog in range(programs):
            self.program(prog)
            for k in sorted(self.dead):  # collective on the world: every rank replaces the same groups
                self.replace(k)
            self.dead = set()
        return self.failures


def main():
    seed, programs = int(sys.argv[1]), int(sys.argv[2])
    opts = dict(zip(sys.argv[3::2], sys.argv[4::2]))
    fatal = opts.get("--fatal")
    dt.init()
    f = Fuzzer(seed)
    f.extra_rate = float(opts.get("--extra", EXTRA_RATE))
    if fatal:
        rng = np.random.default_rng([seed, 7])
        victim, at = int(rng.integers(dt.size())), int(rng.integers(1, max(2, programs // 2)))
        for prog in range(programs):
            if prog == at and dt.rank() == victim and fatal == "skip":
                f.skip_prog = prog
            elif prog == at and dt.rank() == victim:
                print(f"FUZZ-FATAL rank {victim} {fatal} at program {prog} (seed {seed})", flush=True)
                if fatal == "exit":
                    sys.exit(0)
                raise RuntimeError(f"injected failure on rank {victim}")
            f.program(prog)
        print("FUZZ-UNREACHABLE", flush=True)
        return
    failures = f.run(programs)
    allf = dt.world().comm.gather(failures, root=0)
    counts = dt.world().comm.reduce(np.array([f.calls, f.faults]), root=0)
    if dt.rank() == 0:
        for r, fl in enumerate(allf):
            for line in fl:
                print(f"FUZZ-FAIL rank {r}: {line}", flush=True)
        print(f"fuzz: {programs} programs, {counts[0]} collectives, {counts[1]} faults, seed {seed}, "
              f"{sum(map(len, allf))} failures", flush=True)


if __name__ == "__main__":
    main()
