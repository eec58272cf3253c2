"""One parameter-server shard: a thread on a worker rank that owns a contiguous range of the flat
parameter vector, applies the workers' gradients to it with its own optimizer, and answers pulls
as the clock rule allows (clock.py).

Messages (on the parameter servers' private communicator, ps.py):

    worker -> server   TAG_HDR  int64 [kind, clock, version]   kind PUSH: the gradient of the
                       TAG_DATA the gradient's slice            worker's step `clock`, computed on
                                                                shard `version`; FIN: finished
                                                                after `clock` steps (no data)
    server -> worker   TAG_RHDR int64 [version, more, clocks...] the answer to the pull that every
                       TAG_RDATA the shard's values              push (and FIN) implies; `more`:
                                                                 may the worker do another step
                                                                 (the budget keeper's grant, below)

How updates are applied decides what the modes mean:

- **ssp:S - aggregated per clock.** The gradients of clock c are summed as they arrive and
  applied once, averaged, when all workers pushed clock c (clocks complete in order: pushing
  c + 1 needs c). The version is the number of complete clocks, so a pull for step t answered
  when ``min(clocks) >= t - S`` sees exactly clocks < min(clocks) - never a gradient of a later
  clock. With S = 0 that is clocks < t: bulk-synchronous SGD on the global batch, for any
  element-wise optimizer (SGD with momentum/Nesterov/weight decay, Adam, AdamW), bit for bit up
  to the summation order. The staleness of an update of clock c is c - the version it was
  computed on (<= S). Reading one's own writes early (Ho et al. 2013) is not done: it would make
  S = 0 differ from synchronous SGD.
- **async - per push** (Dean et al. 2012, Downpour): every gradient is applied on arrival as one
  optimizer step with the learning rate divided by the number of workers (a round of pushes then
  moves the model about as far as one synchronous step); the version counts pushes.

**The global update budget (async with ``budget``).** Downpour runs until the servers applied a
number of updates, not until every worker did a number of steps: fast workers do more of them.
One server decides - the *budget keeper*, rank 0's, because the shards see pushes in different
orders and a count per shard would let one worker's push be in the budget on one shard and
beyond it on another. The keeper grants steps: every worker's first step is granted at set-up
(worker w < budget), and its answer to each push says whether that worker may do one more
(``more`` = granted < budget, counting the grant). A granted step is always pushed and every push
is applied on every shard, so exactly ``budget`` pushes are applied in total - no push beyond it
exists to discard. Each push is applied with the learning rate of the *global* step (pushes
applied on this shard // workers), so the schedule follows the servers' count, not a worker's.
At the end the servers check that the workers' clocks add up to the budget.
"""
from __future__ import annotations

import collections
import copy
import threading
import time

import numpy as np

from ... import faults, mpi
from ...nn.module import Parameter
from .clock import FINAL, RECORDS, Applied, may_start

TAG_HDR, TAG_DATA, TAG_RHDR, TAG_RDATA = 41_001, 41_002, 41_003, 41_004
PUSH, FIN = 0, 1


def clone_optimizer(opt, params):
    """An optimizer of `opt`'s class and options over `params`, with fresh state.

    A shallow copy keeps every option whatever the class (SGD's momentum, Adam's betas, ...)
    without this module knowing them; the parameter list, state, step count and hooks are new."""
    c = copy.copy(opt)
    c.params, c.state, c.steps, c._post_step_hooks = list(params), {}, 0, []
    return c


class ShardServer(threading.Thread):
    """The server of one shard (see the module docstring); runs until every worker finished.

    Args:
        comm: the parameter servers' communicator (every rank is a worker).
        values: this shard's initial values (a copy of the flat parameters' range).
        opt, sched: the workers' optimizer and schedule, cloned for the shard.
        staleness: S of ssp:S, or None (async).
        budget: async only: the total number of pushes the servers apply (None: every worker does
            its own number of steps).
    """

    def __init__(self, comm, values: np.ndarray, opt, sched, staleness: int | None, budget: int | None = None):
        super().__init__(name="disttrain-ps-server", daemon=True)
        self.comm, self.staleness = comm, staleness
        self.workers = comm.Get_size()
        self.param = Parameter(values, name="ps.shard")
        self.opt = clone_optimizer(opt, [self.param])
        self.sched = copy.copy(sched)  # the learning rate of step t: sched.load_state_dict({"t": t})
        self.sched.opt = self.opt
        self.clocks = np.zeros(self.workers, np.int64)
        self.version = 0
        self.budget = budget
        self.keeper = budget is not None and comm.Get_rank() == 0  # the one server that grants steps
        self.granted = min(self.workers, budget) if budget is not None else 0  # the first steps: at set-up
        self._acc: dict = {}  # ssp: clock -> [sum of its gradients, how many, [(worker, computed_on)]]
        self._waiting: dict = {}  # worker -> the step its pending pull is for (FINAL: the last one)
        self._finished: set = set()
        self._sends: list = []  # (request, buffer): buffers live until their send completed
        # Applied records (appended here, read by the worker's record()): the newest RECORDS only,
        # so that a long run's memory stays bounded; applied_total counts every one
        self.applied: collections.deque = collections.deque(maxlen=RECORDS)
        self.applied_total = 0
        self.bytes_sent = 0  # payload bytes of answers to other ranks

    def run(self) -> None:
        """Serve until every worker got its final answer. An exception here ends the whole job
        (runtime's thread excepthook: MPI_Abort with this rank's traceback)."""
        try:
            self._serve()
        except SystemExit as e:  # the excepthook ignores SystemExit in a thread: the workers would hang
            raise RuntimeError(f"parameter server on rank {self.comm.Get_rank()}: its thread exited ({e!r}) while "
                               "workers still need its shard") from e

    def _serve(self) -> None:
        MPI = mpi.MPI
        st, hdr = MPI.Status(), np.empty(3, np.int64)
        inbox = np.empty_like(self.param.data)
        delay = 0.0
        while len(self._finished) < self.workers or self._waiting:
            if not self.comm.Iprobe(MPI.ANY_SOURCE, TAG_HDR, st):
                self._sends = [(q, b) for q, b in self._sends if not q.Test()]
                # sleep in growing steps: ranks outnumber cores here, and the worker on this rank
                # needs the core (Test/Iprobe also drive MPI progress for our pending answers)
                delay = min(1e-3, delay * 2 if delay else 2e-5)
                time.sleep(delay)
                continue
            delay = 0.0
            w = st.Get_source()
            self.comm.Recv(hdr, w, TAG_HDR)
            kind, clock, seen = (int(v) for v in hdr)
            faults.point("ps-serve")  # tests: the server dies while it handles a message
            if kind == PUSH:
                self.comm.Recv(inbox, w, TAG_DATA)
                self._push(w, clock, seen, inbox)
            else:
                self._finish(w, clock)
            self._answer()
        MPI.Request.Waitall([q for q, _ in self._sends])
        self._sends = []

    def _push(self, w: int, clock: int, seen: int, g: np.ndarray) -> None:
        if clock != self.clocks[w] or w in self._finished:
            raise RuntimeError(f"parameter server on rank {self.comm.Get_rank()}: worker {w} pushed its step {clock} "
                               f"but had pushed {self.clocks[w]} steps{' and finished' if w in self._finished else ''}"
                               " (a worker skipped, repeated or added a step)")
        self.clocks[w] += 1
        self._waiting[w] = clock + 1  # every push asks for the parameters of the next step
        if self.staleness is None:  # async: this gradient now, as one step at lr / workers
            self.applied.append(Applied(w, clock, seen, self.version))
            self.applied_total += 1
            # the schedule's step: the global count under a budget, else the worker's own step
            self._apply(g, self.version // self.workers if self.budget is not None else clock, 1.0 / self.workers)
            return
        acc = self._acc.setdefault(clock, [np.zeros_like(g), 0, []])
        acc[0] += g
        acc[1] += 1
        acc[2].append((w, seen))
        while self._acc.get(self.version, (None, 0))[1] == self.workers:  # a complete clock: apply it
            total, _, who = self._acc.pop(self.version)
            total /= self.workers
            self.applied.extend(Applied(u, self.version, s, self.version) for u, s in who)
            self.applied_total += len(who)
            self._apply(total, self.version, 1.0)

    def _apply(self, g: np.ndarray, step: int, lr_scale: float) -> None:
        self.param.grad[...] = g
        self.sched.load_state_dict({"t": step})  # the learning rate of that step (warm-up, cosine)
        self.opt.lr *= lr_scale
        self.opt.step()
        self.version += 1

    def _finish(self, w: int, clock: int) -> None:
        if clock != self.clocks[w]:
            raise RuntimeError(f"parameter server on rank {self.comm.Get_rank()}: worker {w} finished after {clock} "
                               f"steps but pushed {self.clocks[w]}")
        self._finished.add(w)
        self._waiting[w] = FINAL

    def _answer(self) -> None:
        """Answer every pull the clock rule now allows (the final ones once all workers finished)."""
        done = len(self._finished) == self.workers
        if self._finished and (done or self.staleness is not None):
            # a finished worker's clock never moves again: a pull it holds back waits forever
            ended = min(int(self.clocks[w]) for w in self._finished)
            stuck = [w for w, step in self._waiting.items() if step != FINAL and step - self.staleness > ended] \
                if self.staleness is not None else []
            if self.budget is not None:
                if done and int(self.clocks.sum()) != self.budget:
                    raise RuntimeError(f"parameter server on rank {self.comm.Get_rank()}: the workers pushed "
                                       f"{int(self.clocks.sum())} steps in total, not the budget of {self.budget} "
                                       f"(steps pushed per worker: {self.clocks.tolist()})")
            elif stuck or (done and len(set(self.clocks.tolist())) > 1):
                raise RuntimeError(f"parameter server on rank {self.comm.Get_rank()}: the workers finished after "
                                   f"different numbers of steps (steps pushed per worker: {self.clocks.tolist()}, "
                                   f"finished: {sorted(self._finished)})")
        for w, step in list(self._waiting.items()):
            if (done and step == FINAL) or may_start(step, self.clocks, self.staleness):
                del self._waiting[w]
                more = int(step != FINAL)
                if self.keeper and more:  # grant one more step while the budget lasts
                    more = int(self.granted < self.budget)
                    self.granted += more
                hdr = np.concatenate([[self.version, more], self.clocks]).astype(np.int64)
                data = self.param.data.copy()  # the shard changes while the send is in flight
                self._sends += [(self.comm.Isend(hdr, w, TAG_RHDR), hdr), (self.comm.Isend(data, w, TAG_RDATA), data)]
                if w != self.comm.Get_rank():
                    self.bytes_sent += data.nbytes

    def state(self) -> dict:
        """The shard's optimizer state {buffer name: flat array} and step count (after the run)."""
        return dict(self.opt.state.get(self.param.name, {})), self.opt.steps
