"""Metrics of the main job: one record per logged interval (loss, rates, communication on one
clock, waits, memory) and the progress line."""


import resource
import time

import numpy as np

import disttrain as dt
from disttrain import mpi, stall


def comm_fields(comm_total: float, exposed_total: float, steps: int) -> dict:
    """The communication fields of one logged interval: comm_s and exposed_comm_s, seconds per step.

    Both come from DataParallel's counters and rely on their definition (parallel/data.py):
    ``comm_seconds`` is the union of the time gradient communication was in flight and
    ``exposed_comm_seconds`` the part of it during which the step waited - the same clock, so
    0 <= exposed <= comm per interval by construction. A DataParallel whose counters break that
    (e.g. comm timed on the communication thread, exposed on the caller: queueing and wake-up
    latency then count as exposed but not as comm) gets both fields null, the raw values under
    *_raw_s and ``comm_accounting: "inconsistent"`` - never a record or progress line that
    contradicts itself, and no clamp that would hide the inconsistency."""
    comm, exposed = comm_total / steps, exposed_total / steps
    if 0 <= exposed <= comm * (1 + 1e-9) + 1e-12:  # tolerance: summation rounding only
        return dict(comm_s=comm, exposed_comm_s=exposed)
    return dict(comm_s=None, exposed_comm_s=None, comm_raw_s=comm, exposed_comm_raw_s=exposed,
                comm_accounting="inconsistent")


def comm_summary(rec: dict) -> str:
    """The progress line's communication part: shares of the step time, exposed never above comm."""
    if rec["comm_s"] is None:
        return "comm n/a (inconsistent counters)"
    t = rec["step_time_s"] or 1.0
    return f"comm {rec['comm_s'] / t:4.0%} of step, exposed {rec['exposed_comm_s'] / t:4.0%}"


class Interval:
    """What happened on this rank since the last logged step; `record` turns it into one metrics
    object (collective: every rank contributes its losses, counts and times)."""

    def __init__(self, ddp, start_step: int, loss_sum: float = 0.0, count: float = 0.0):
        """`start_step`: the last logged step (the interval covers the steps after it); `loss_sum`
        and `count`: this rank's part of the interval done before a resume (from the checkpoint)."""
        self.ddp, self.t0, self.start_step = ddp, time.perf_counter(), start_step
        self.loss_sum, self.count, self.global_count = loss_sum, count, 0.0
        self.steps = 0  # steps timed by this process: time, bytes and rates are per step over these
        self.busy, self.wait = [], []  # per step: seconds computing, seconds waiting at gradient sync
        self.real = self.padded = 0
        self.imbalance = []
        self.c0, self.e0, self.w0 = ddp.comm_seconds, ddp.exposed_comm_seconds, dict(ddp.wire_stats)
        self.h0, self.b0 = ddp.handoff_seconds, stall.blocking_seconds
        self.o0 = getattr(ddp, "blocking_overlap_seconds", 0.0)

    def add(self, loss, batch, busy, wait):
        self.steps += 1
        self.loss_sum += loss * batch.count
        self.count += batch.count
        self.global_count += batch.global_count
        self.busy.append(busy)
        self.wait.append(wait)
        if batch.stats:
            self.real += batch.stats["real_tokens"]
            self.padded += batch.stats["padded_tokens"]
            self.imbalance.append(batch.stats["imbalance"])

    def exclude(self, seconds: float, blocking: float) -> None:
        """Leave time spent outside training (an evaluation) out of the interval: its clock and
        the blocking communication in it (collective evaluations: embedding AllToAlls, pipeline
        and tensor-parallel traffic) - the clock alone left that communication in, above 100% of
        the step."""
        self.t0 += seconds
        self.b0 += blocking

    def progress(self, skipped: int, consecutive: int) -> dict:
        """What a checkpoint keeps of this interval (see save_checkpoint)."""
        return dict(interval_start=self.start_step, loss_sum=self.loss_sum, count=self.count, skipped=skipped,
                    consecutive=consecutive)

    def record(self, done, unit, opt, skipped, alone: bool = False) -> dict:
        """The metrics object of the interval ending at step `done`: the loss over all its steps
        (including those before a resume), times and rates per step over the steps this process ran.
        `alone`: no communication - this rank's own view (loss, rate, per-rank lists of one), for
        modes whose workers run at their own pace (a collective would make fast ones wait)."""
        ddp, n = self.ddp, max(1, self.steps)
        comm = mpi.MPI.COMM_SELF if alone else dt.world().comm
        dt_s = time.perf_counter() - self.t0
        # read with the clock: this record's own collectives below (waiting for the slowest rank to
        # log) are not part of the interval's steps - counted here, comm exceeded 100% of the step
        blocking = stall.blocking_seconds - self.b0
        own = np.array([self.loss_sum, self.count])
        tot = own if alone else dt.allreduce(own, algorithm="mpi")
        rec = dict(step=done, loss=float(tot[0] / max(tot[1], 1)), step_time_s=dt_s / n)
        # loss terms (samples or real tokens) per second: the job's, or alone this rank's
        rec[f"{unit}_per_s"] = (self.count if alone else self.global_count) / dt_s
        # Blocking communication on the training thread (tensor-parallel allreduces, pipeline
        # receives, embedding AllToAlls, the finite-gradient vote) is in flight and waited for
        # at once: it adds to both - comm_s once, where it ran while the buckets did (the union:
        # summed, comm_s passed 100% of the step, e.g. dlrm's AllToAlls beside its buckets).
        both = getattr(ddp, "blocking_overlap_seconds", 0.0) - self.o0
        rec.update(comm_fields(ddp.comm_seconds - self.c0 + blocking - both, ddp.exposed_comm_seconds - self.e0 + blocking, n))
        rec["handoff_s"] = (ddp.handoff_seconds - self.h0) / n
        rec["blocking_comm_s"] = blocking / n
        rec.update(lr=opt.lr, skipped_steps=skipped)
        w = ddp.wire_stats  # this rank's gradient bytes; ranks send alike
        rec["sent_bytes"] = (w["sent_bytes"] - self.w0["sent_bytes"]) / n
        # issue 18's names, for every --sync mode: the mode's own exchange is added (merge_sync)
        rec["wait_s"] = float(np.mean(self.wait)) if self.wait else 0.0
        rec["bytes_sent_per_step"] = rec["sent_bytes"]
        rec["compression_ratio"] = w["ratio"]
        # the step's own wait (the exposed counter is measured on the training thread's clock)
        rec["compute_s"] = rec["step_time_s"] - (ddp.exposed_comm_seconds - self.e0 + ddp.handoff_seconds - self.h0
                                                  + blocking) / n
        # Per rank: the seconds per step it waited at the gradient synchronisation, and the part
        # of that explained by load imbalance (the slowest rank's compute time minus its own).
        busy = np.array(comm.allgather(self.busy))
        rec["sync_wait_s"] = [float(np.mean(x)) for x in comm.allgather(self.wait)]
        rec["imbalance_wait_s"] = [float(x) for x in (busy.max(axis=0) - busy).mean(axis=1)]
        if self.padded:
            rec.update(padding=1.0 - self.real / self.padded, imbalance=float(np.mean(self.imbalance)),
                       imbalance_max=float(np.max(self.imbalance)))
        rec["peak_rss_mib"] = comm.gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, root=0)
        return rec



#: record() fields of a --sync mode that add to DataParallel's (its exchange waits and sends on top)
_ADDED = ("wait_s", "bytes_sent_per_step")


def merge_sync(rec: dict, extra: dict) -> None:
    """Merge a --sync mode's record() into the interval's record: ``wait_s`` and
    ``bytes_sent_per_step`` add to DataParallel's gradient wait and bytes (a mode may do both:
    hybrid groups allreduce gradients inside a group and exchange between groups); the others
    (staleness_mean, staleness_max, sync_period, ...) are set as they are."""
    for k, v in extra.items():
        rec[k] = rec.get(k, 0.0) + v if k in _ADDED else v


def sync_summary(rec: dict) -> str:
    """The progress line's --sync part: this rank's wait and bytes sent per step (and staleness)."""
    out = f"wait {1e3 * rec.get('wait_s', 0.0):.1f} ms, sent {rec.get('bytes_sent_per_step', 0.0) / 1024:,.0f} KiB/step"
    if "staleness_mean" in rec:
        out += f", staleness {rec['staleness_mean']:.2f} (max {rec.get('staleness_max', 0)})"
    return out
