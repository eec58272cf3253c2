"""Disagreement fuzzer: random collectives in which, now and then, ONE rank changes one thing.

    mpiexec -n P python tests/fuzz_disagree.py SEED PROGRAMS [--rate R] [--known 1] [--hang-seconds S]

Every rank draws the same program from SEED: one collective (allreduce, allreduce_, allreduce_async,
broadcast, allgather, reduce_scatter, alltoall) on a random group of tests/fuzz_program.py's pool,
with a random dtype, size, op, algorithm and root. With probability R (default 0.6) one member of
the group deviates in one respect, chosen at random:
- harmful (the ranks no longer call the same collective): another shape, dtype, op, algorithm,
  root, or collective kind. Oracle: every member raises CollectiveError - never a result on some
  rank, never a hang;
- harmless (the same collective, spelled or laid out differently on that rank): in place instead
  of out of place, a strided or read-only input, a Python list, np.str_ / np.int64 spellings of
  op / root / algorithm, verbose logging switched on around the call. Oracle: every member's
  result is bit-identical to the NumPy reduction of every member's input (small integers: exact)
  and, for integer sums / min / max, to the MPI library's own collective on a duplicate of the
  group's communicator.
- lane (harmful): a blocking call on one rank against the asynchronous one on the others (two
  communicators: attack9, /tmp/attack9-to-call8/02.md). The stall inspector finds the circular
  wait and ends it with CollectiveError on every member (stall.py, waitfor.py), after about two
  stall intervals: the fuzzer sets a 0.5 s interval unless DISTTRAIN_STALL_SECONDS is set.
  The ended call leaves its group unusable (by design), so every rank replaces that group of
  the pool with a new one of the same members after such a program.
--known 1 adds deviations that are known to hang today (kept out of the suite until fixed):
set_validation(False) on one rank (the lead's finding, engineer call8).
A program that has not finished after --hang-seconds (default 30) is a hang: the fuzzer prints
"FUZZ-HANG" with the seed, program and deviation and ends the job. Summary line:
"disagree: N programs, D deviations (H harmful), seed S, F failures".
"""
import os
import sys
import threading
import time

import numpy as np

import disttrain as dt
from disttrain import mpi

from fuzz_program import ALGS, expected_reduce, layout, make_pool, rank_data, same_bits

KINDS = ["allreduce", "allreduce_", "allreduce_async", "broadcast", "allgather", "reduce_scatter", "alltoall"]
BLOCKING = ["allreduce", "broadcast", "allgather", "reduce_scatter", "alltoall"]  # lane "b": may replace each other
REDUCING = ("allreduce", "allreduce_", "allreduce_async", "reduce_scatter")
DTYPES = [np.float16, np.float32, np.float64, np.int32, np.int64]
OPS = ["sum", "avg", "min", "max", "prod"]
SIZES = [0, 1, 2, 3, 5, 17, 64, 1000, 40000, 300000]  # up to 2.4 MiB: past the fused limit at every p
HARMFUL = ["shape", "dtype", "op", "algorithm", "root", "kind", "lane"]
HARMLESS = ["inplace", "strided", "readonly", "list", "spelling", "verbose"]
KNOWN = ["validation_off"]


def other_shape(x, rows):
    """x with another shape the collective must refuse: a longer vector, or (row collectives, whose
    first dimensions may differ) another row length."""
    if rows:
        return np.concatenate([x, x[:, :1]], axis=1)
    return np.concatenate([x, x[:1]]) if x.size else np.zeros(1, x.dtype)


def family(kind):
    return "allreduce" if kind.startswith("allreduce") else kind


class Program:
    """One drawn program: the call every member makes, and the deviation of one member (or None)."""

    def __init__(self, seed, prog, pool, rate, known):
        rng = np.random.default_rng([seed, prog, 1])
        self.gi = int(rng.integers(len(pool)))
        g = pool[self.gi]
        self.kind = str(rng.choice(KINDS))
        fam = family(self.kind)
        self.dtype = np.dtype(rng.choice(DTYPES))
        self.n = int(rng.choice(SIZES))
        rows = self.kind in ("allgather", "alltoall", "reduce_scatter")
        if rows:
            self.n = min(self.n, 1000)  # rows of 3: the same order of bytes
        self.rows = rows
        self.op = str(rng.choice(OPS)) if self.kind in REDUCING else None
        self.algorithm = str(rng.choice(ALGS[fam]))
        if fam == "allreduce" and self.dtype == np.float16 and self.op == "prod":
            self.op = "sum"  # a float16 product of small integers overflows differently per order
        self.root = int(rng.integers(len(g.ranks))) if self.kind == "broadcast" else None
        self.bad, self.what = None, None
        if rng.random() < rate and len(g.ranks) > 1:
            self.bad = int(rng.integers(len(g.ranks)))
            menu = HARMFUL + HARMLESS + (KNOWN if known else [])
            self.what = str(rng.choice(menu))
        self.harmful = self.what in HARMFUL or self.what in KNOWN
        self.alt = np.random.default_rng([seed, prog, 2])  # the deviant's own choices

    def __str__(self):
        dev = f"; group rank {self.bad} deviates: {self.what}" if self.what else ""
        return (f"{self.kind} n={self.n} {self.dtype} op={self.op} algorithm={self.algorithm} root={self.root} "
                f"group {self.gi}{dev}")


class Fuzzer:
    def __init__(self, seed, rate, known):
        self.seed, self.rate, self.known = seed, rate, known
        self.r = dt.rank()
        self.pool = make_pool(dt.size(), np.random.default_rng([seed, 999]))
        self.refs = [g.comm.Dup() if g.is_member else None for g in self.pool]
        self.world = mpi.MPI.COMM_WORLD.Dup()  # the fuzzer's own bookkeeping: outside disttrain's calls
        self.failures, self.deviations, self.harmful = [], 0, 0
        self.current = None  # (program number, Program) being run: what a hang report names

    def data(self, prog, pr, gr):
        rows = 3 if pr.rows else None
        n = pr.n
        return rank_data(self.seed, prog, 0, gr, n, pr.dtype, rows=n if rows else None)

    def expected(self, prog, pr, g):
        xs = [self.data(prog, pr, q) for q in range(len(g.ranks))]
        me = g.rank
        if pr.kind == "broadcast":
            return xs[pr.root]
        if pr.kind == "allgather":
            return np.concatenate(xs)
        if pr.kind == "alltoall":
            return np.concatenate([np.array_split(x, len(xs))[me] for x in xs])
        full = expected_reduce(xs, pr.op)
        if pr.kind == "reduce_scatter":
            return np.array_split(full, len(xs))[me]
        return full

    def call(self, pr, g, x, deviant):
        """Run this member's call (with the deviation when `deviant`); returns the result array."""
        kind, op, alg, root = pr.kind, pr.op, pr.algorithm, pr.root
        what = pr.what if deviant else None
        a = pr.alt
        if what == "shape":
            x = other_shape(x, pr.rows)
        elif what == "dtype":
            x = x.astype(np.float32 if x.dtype != np.float32 else np.float64)
        elif what == "op":
            op = "max" if op != "max" else "min"
            if kind not in REDUCING:  # nothing to change there: another shape instead
                x = other_shape(x, pr.rows)
        elif what == "algorithm":
            alg = str(a.choice([n for n in ALGS[family(kind)] if n != alg]))
        elif what == "root":
            if kind == "broadcast":
                root = (root + 1) % len(g.ranks)
            else:
                x = x.astype(np.float32 if x.dtype != np.float32 else np.float64)
        elif what == "kind":
            if kind == "allreduce_async":  # the asynchronous lane has one kind (a lane change is KNOWN "lane")
                x = other_shape(x, pr.rows)
            else:
                kind = str(a.choice([k for k in BLOCKING if k != family(kind)]))
                op, root, alg = op or "sum", root or 0, "auto"
        elif what == "strided":
            x = layout(x, "strided")
        elif what == "readonly" and kind in ("allreduce", "allreduce_async", "broadcast", "allgather",
                                             "reduce_scatter", "alltoall"):
            x = layout(x, "readonly")
        elif what == "list" and x.dtype in (np.float64, np.int64) and x.size and kind not in ("allreduce_", "allreduce_async"):
            # (not allreduce_async: it refuses a list on every rank - /tmp/attack9-to-call8/03.md)
            x = x.tolist()
        elif what == "spelling":
            op = np.str_(op) if op is not None else op
            root = np.int64(root) if root is not None else root
            alg = np.str_(alg)
        elif what == "inplace":
            kind = {"allreduce": "allreduce_", "allreduce_": "allreduce"}.get(kind, kind)
            if kind == "broadcast":
                kind = "broadcast_"
        elif what == "lane":
            kind = "allreduce_async" if kind != "allreduce_async" else "allreduce"
            op = op or "sum"
        verbose = what == "verbose"
        no_check = what == "validation_off"
        if verbose:
            dt.set_verbose(True)
        if no_check:
            dt.set_validation(False)
        try:
            return self._run(kind, x, op, alg, root, g)
        finally:
            if verbose:
                dt.set_verbose(False)
            if no_check:
                dt.set_validation(True)

    @staticmethod
    def _run(kind, x, op, alg, root, g):
        if kind == "allreduce":
            return dt.allreduce(x, op, algorithm=alg, group=g)
        if kind == "allreduce_":
            return dt.allreduce_(np.array(x, copy=True), op, algorithm=alg, group=g)
        if kind == "allreduce_async":
            return dt.allreduce_async(x, op, algorithm=alg, group=g).wait()
        if kind == "broadcast":
            return dt.broadcast(x, root, algorithm=alg, group=g)
        if kind == "broadcast_":
            return dt.broadcast_(np.array(x, copy=True), root, algorithm=alg, group=g)
        if kind == "allgather":
            return dt.allgather(x, algorithm=alg, group=g)
        if kind == "reduce_scatter":
            return dt.reduce_scatter(x, op, algorithm=alg, group=g)
        return dt.alltoall(x, algorithm=alg, group=g)[0]

    def mpi_oracle(self, pr, g, x, got):
        """Integer sums / min / max of an allreduce: the MPI library's own answer, bit for bit."""
        if family(pr.kind) != "allreduce" or pr.op not in ("sum", "min", "max") or x.dtype.kind != "i":
            return None
        MPI = mpi.MPI
        ref = np.array(x, copy=True)
        self.refs[pr.gi].Allreduce(MPI.IN_PLACE, ref, op={"sum": MPI.SUM, "min": MPI.MIN,
                                                                    "max": MPI.MAX}[pr.op])
        return None if same_bits(ref, got) else "differs from the MPI library's allreduce"

    def program(self, prog):
        pr = Program(self.seed, prog, self.pool, self.rate, self.known)
        self.current = (prog, pr)
        g = self.pool[pr.gi]
        outcome, problem = "skip", None
        if g.is_member:
            self.deviations += g.rank == pr.bad  # counted once, on the deviant
            self.harmful += g.rank == pr.bad and pr.harmful
            x = self.data(prog, pr, g.rank)
            try:
                got = np.asarray(self.call(pr, g, x, g.rank == pr.bad))
                outcome = "ok"
                if pr.harmful:
                    problem = "a result, not CollectiveError"
                else:
                    want = self.expected(prog, pr, g)
                    if not same_bits(got, want):
                        problem = f"wrong result (got {got.ravel()[:4]}, want {want.ravel()[:4]})"
                    else:
                        problem = self.mpi_oracle(pr, g, x, got)
            except dt.CollectiveError as e:
                outcome = "error"
                if not pr.harmful:
                    problem = f"CollectiveError on a harmless deviation: {str(e)[:300]}"
        # every member must end alike (all results or all errors): compared outside disttrain
        outs = self.world.allgather(outcome)
        if len({o for o in outs if o != "skip"}) > 1 and problem is None:
            problem = f"members ended differently: {outs}"
        if problem:
            self.failures.append(f"seed={self.seed} program={prog} ({pr}): rank {self.r}: {problem}")
        if pr.what == "lane":  # drawn alike on every rank: the ended call's group is unusable now
            self.pool[pr.gi] = dt.new_group(g.ranks)
        self.current = None

    def watch(self, seconds):
        """A program that runs longer than `seconds` is a hang: say which, and end the job."""
        def loop():
            last, since = None, time.monotonic()
            while True:
                time.sleep(0.5)
                cur = self.current
                key = cur[0] if cur else None
                if key != last:
                    last, since = key, time.monotonic()
                elif cur is not None and time.monotonic() - since > seconds:
                    print(f"FUZZ-HANG rank {self.r}: seed={self.seed} program={cur[0]} ({cur[1]}) has not "
                          f"finished after {seconds} s", flush=True)
                    os._exit(7)
        threading.Thread(target=loop, name="fuzz-hang-watch", daemon=True).start()


def main():
    seed, programs = int(sys.argv[1]), int(sys.argv[2])
    opts = dict(zip(sys.argv[3::2], sys.argv[4::2]))
    dt.init()
    if "DISTTRAIN_STALL_SECONDS" not in os.environ:
        dt.set_stall_timeout(0.5)  # a circular wait ("lane") is ended ~1.5 s later (waitfor.py)
    f = Fuzzer(seed, float(opts.get("--rate", 0.6)), opts.get("--known", "0") == "1")
    f.watch(float(opts.get("--hang-seconds", 30)))
    for prog in range(programs):
        f.program(prog)
    allf = f.world.gather(f.failures, root=0)
    counts = f.world.reduce(np.array([f.deviations, f.harmful]), root=0)
    if dt.rank() == 0:
        for r, fl in enumerate(allf):
            for line in fl[:20]:
                print(f"FUZZ-FAIL rank {r}: {line}", flush=True)
        print(f"disagree: {programs} programs, {counts[0]} deviations ({counts[1]} harmful), seed {seed}, "
              f"{sum(map(len, allf))} failures", flush=True)


if __name__ == "__main__":
    main()
