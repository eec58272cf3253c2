"""Between-replica exchanges of the periodic modes (``local:H``, ``hybrid:G``): what happens every
H steps to bring replicas that trained apart back together.

One signature for the family (registry ``EXCHANGES``, the main job's ``--hybrid-exchange``):
``EXCHANGES[name](group, cfg)`` builds the exchange over `group` (every data-parallel rank); then

    verdict = exchange(model, opt, skipped)   # collective over `group`: True if no rank skipped
    exchange.seconds, exchange.sent_bytes      # counters: time in the exchange, payload sent

``average`` (the only member today) is periodic model averaging - local SGD (Stich 2019, "Local
SGD converges fast and communicates little"; FedAvg, McMahan et al. 2017) - with, by option, the
optimizer state averaged too and an outer Nesterov optimizer on the averaged delta (DiLoCo,
Douillard et al. 2023). An asynchronous exchange (a parameter server between group leaders) is a
second member with the same call.
"""
from __future__ import annotations

import time

import numpy as np

from ...comm import api as C
from ...compression.base import ring_allreduce_bytes
from ...registry import Registry

EXCHANGES = Registry("between-group exchange")


@EXCHANGES.register("average")
class Average:
    """Average the parameters (and, with ``--local-average-state``, the optimizer state) over
    `group` with ONE fused allreduce of a flat buffer; then, when ``--outer-lr`` / ``--outer-momentum``
    differ from (1, 0), take an outer Nesterov step from the last averaged model along the averaged
    delta (DiLoCo). Plain averaging (outer lr 1, momentum 0) sets the model to the average exactly.

    Every rank of `group` contributes its parameters with the same weight: replicas of one hybrid
    group hold identical parameters, so groups count by their size - which is what makes
    ``hybrid:G`` with uneven groups reproduce synchronous SGD at period 1 (each group's step is
    its own mean gradient; the size-weighted mean of those is the global batch's).

    Args:
        group: the data-parallel ranks (all replicas, of every group).
        cfg: the job's TrainConfig (local_average_state, outer_lr, outer_momentum, algorithm).
    """

    def __init__(self, group, cfg):
        self.group, self.state = group, cfg.local_average_state
        self.outer_lr, self.outer_mu = cfg.outer_lr, cfg.outer_momentum
        self.algorithm = cfg.algorithm
        self.seconds, self.sent_bytes = 0.0, 0
        self.anchor = self.velocity = None  # DiLoCo: the last outer model and its momentum (flat)
        self.buffers = None  # the optimizer buffers averaged, once every rank holds all of them

    def arrays(self, model, opt) -> list:
        """What is averaged, in an order every rank shares: parameters (by name), then the
        optimizer's float buffers (by "param/buffer" name, the list :meth:`agreed_buffers` gives)."""
        out = [p.data for p in sorted(model.parameters(), key=lambda p: p.name) if p.replicated]
        if self.state:
            names = self.agreed_buffers(opt)  # first: it may create this rank's missing buffers
            st = opt.state_arrays()
            out += [st[k] for k in names]
        return out

    def agreed_buffers(self, opt) -> list:
        """The names of the optimizer buffers every rank averages, agreed over the group.

        An optimizer creates its buffers at its first step, so a rank that skipped every local
        step so far (non-finite gradients - the job's --on-nonfinite skip) has none, and its flat
        buffer was shorter than its peers': the exchange raised CollectiveError on every rank and
        the job died on a step it was told to skip. So the ranks agree on the union of their
        buffers (name, shape, dtype: one small allgather), and a rank missing one creates it as
        zeros - the value the optimizer would have created it with - and receives the average like
        the others. Once every rank holds every buffer the list is fixed (optimizers never drop
        buffers), so in a normal run this costs one allgather at the first exchange only (with a
        stateless optimizer - plain SGD - one of empty lists per exchange)."""
        if self.buffers is not None:
            return self.buffers
        st = opt.state_arrays()
        mine = sorted((k, v.shape, v.dtype.str) for k, v in st.items() if v.dtype.kind == "f")
        every = self.group.comm.allgather(mine)  # a few names: a small control message
        union = sorted(set().union(*map(set, every)))
        if len({k for k, _, _ in union}) != len(union):
            # one buffer with two shapes or dtypes on two ranks: not averageable; the same message everywhere
            raise ValueError(f"optimizer buffers differ across ranks: {union}")
        for k, shape, dtype in union:
            if k not in st:
                name, buf = k.rsplit("/", 1)
                opt.state.setdefault(name, {})[buf] = np.zeros(shape, dtype)
        names = [k for k, _, _ in union]
        if union and all(e == union for e in every):
            self.buffers = names
        return names

    def __call__(self, model, opt, skipped: int) -> bool:
        t = time.perf_counter()
        arrays = self.arrays(model, opt)
        dtype = np.result_type(*arrays) if arrays else np.float64
        # one flat buffer: all parameters (+ state) and, last, how many local steps this rank
        # skipped since the last exchange (non-finite gradients) - the verdict rides along, free
        flat = np.concatenate([a.reshape(-1).astype(dtype, copy=False) for a in arrays] + [np.array([skipped], dtype)])
        C.allreduce_(flat, op="avg", algorithm=self.algorithm, group=self.group)
        self.sent_bytes += ring_allreduce_bytes(flat.size, flat.itemsize, self.group.size)
        n = sum(p.data.size for p in model.parameters() if p.replicated)
        if self.outer_lr != 1.0 or self.outer_mu != 0.0:
            flat[:n] = self._outer(flat[:n])
        i = 0
        for a in arrays:
            a.reshape(-1)[...] = flat[i:i + a.size]
            i += a.size
        self.seconds += time.perf_counter() - t
        return bool(flat[-1] == 0)

    def start(self, model) -> None:
        """Remember the starting model (the outer optimizer's first anchor)."""
        if self.outer_lr != 1.0 or self.outer_mu != 0.0:
            self.anchor = np.concatenate([p.data.reshape(-1) for p in sorted(model.parameters(), key=lambda p: p.name)
                                          if p.replicated])
            self.velocity = np.zeros_like(self.anchor)

    def _outer(self, avg: np.ndarray) -> np.ndarray:
        """DiLoCo's outer step: the outer gradient is the anchor minus the averaged model; Nesterov
        momentum as PyTorch's SGD (v <- mu v + g; x <- x - lr (g + mu v))."""
        g = self.anchor - avg
        self.velocity *= self.outer_mu
        self.velocity += g
        self.anchor -= self.outer_lr * (g + self.outer_mu * self.velocity)
        return self.anchor
