"""Embedding tables sharded over ranks, looked up with AllToAll (DLRM's hybrid parallelism: Naumov
et al. 2019, "Deep Learning Recommendation Model for Personalization and Recommendation Systems";
Mudigere et al. 2022, "Software-Hardware Co-design for Fast and Scalable Training of Deep
Learning Recommendation Models").

Recommenders' embedding tables dwarf the dense layers and do not fit one replica, while their
lookups touch only a few rows per sample. So the tables are *model-parallel* - every row lives on
exactly one rank - while the dense MLPs stay *data-parallel* (DataParallel, AllReduce). Each rank
holds a data-parallel share of the batch and, per step:

    forward   1. the row ids this rank's samples need, de-duplicated, go to the ranks that own them
                 (AllToAll of int64 row numbers);
              2. the owners gather those rows and send them back (AllToAll of (rows, dim) vectors);
    backward  3. the gradient of each de-duplicated row goes back to its owner (AllToAll, the same
                 splits as 2 in reverse), which scatter-adds it into its shard's gradient.

De-duplication matters because ids follow a power law: a few hot rows appear in most samples,
and each is sent once per rank and step, not once per occurrence (``stats`` counts both).

Placements (``SHARDINGS``, chosen by name):

- ``table``: each table lives whole on one rank, tables assigned largest-first to the least-loaded
  rank (LPT, balancing memory); a rank may own several tables or none.
- ``row``: every table's rows are split into contiguous blocks, one per rank (``np.array_split``),
  so even one huge table spreads over all ranks. Ids are assumed hashed/scattered; hot ids
  clustered in one block would load its owner.

Both are one mechanism: a placement maps (table, id) to (owner rank, row of the owner's shard), and
each rank keeps its rows of every table in one ``Parameter`` (``shard``) marked
``replicated=False``: DataParallel and ``broadcast_parameters`` leave it alone, because the
AllToAll backward already delivers the complete global-batch gradient (scaled by 1 / group size,
matching DataParallel's average over ranks of per-rank mean losses).

Initialisation never materialises a table: each rank draws only its own rows, from counter-based
generators keyed by (seed, table, block of rows) (``embedding_init.py``), which ``LocalEmbeddings``
uses too - so a sharded model equals the one-process model, the oracle in tests.

Sparse updates (``sparse=True``, opt-in): the shard's ``.grad`` is a ``RowSparseGrad`` - the rows
this step's lookups touched, de-duplicated, and their gradients - and the optimizer updates only
those rows (lazy semantics: ``optim.SGD``, ``optim.Adam``). Without it the gradient is a dense
array of the shard's shape, mostly zeros, and every optimizer step sweeps the whole shard.
"""
from __future__ import annotations

import numpy as np

from ..registry import Registry
from .. import comm as C
from ..comm import validate
from ..nn import kernels as K
from ..nn.layout import Piece
from ..nn.module import Module, Parameter
from ..nn.sparse import RowSparseGrad
from ..groups import as_group
from .counters import Counters
from .embedding_init import seed_from, table_rows


def _table_parameter(data, sparse: bool, **kw) -> Parameter:
    """A table (or shard) parameter; with `sparse` its gradient is row-sparse."""
    if not sparse:
        return Parameter(data, **kw)
    # built on an empty placeholder: Parameter would allocate (and touch) a dense gradient of the
    # shard's size that the row-sparse one replaces at once - a transient copy of the whole shard
    p = Parameter(data[:0], **kw)
    p.data, p.grad = np.ascontiguousarray(data), RowSparseGrad(data.shape, data.dtype)
    return p


def _check_ids(ids, sizes) -> str | None:
    """A problem with a (batch, tables) id array, or None."""
    if ids.ndim != 2 or ids.shape[1] != len(sizes):
        return f"ids must have shape (batch, {len(sizes)} tables), got {ids.shape}"
    if not np.issubdtype(ids.dtype, np.integer):
        return f"ids must be integers, got {ids.dtype}"
    if ids.size:
        lo, hi = ids.min(axis=0), ids.max(axis=0)
        for t, n in enumerate(sizes):
            if lo[t] < 0 or hi[t] >= n:
                return f"ids of table {t} must lie in [0, {n}), got values in [{lo[t]}, {hi[t]}]"
    return None


class LocalEmbeddings(Module):
    """The one-process reference: every table on this rank. forward(ids (B, T)) -> (B, T, dim).

    Args:
        sizes: rows of each table.
        dim: embedding width.
        rng: a Generator; one draw from it is the tables' seed (used when `seed` is None).
        dtype: the tables' dtype.
        seed: the tables' seed (``embedding_init.py``: the same seed gives the same tables here and
            in ``ShardedEmbeddings`` at any number of ranks).
        sparse: row-sparse gradients (``RowSparseGrad``), for optimizers that update only the
            touched rows.

    Example:
        >>> emb = LocalEmbeddings([10, 5], 4, seed=0)
        >>> emb.forward(np.array([[1, 2]])).shape
        (1, 2, 4)
    """

    def __init__(self, sizes, dim: int, rng=None, dtype=np.float32, *, seed: int | None = None, sparse: bool = False):
        self.sizes, self.dim, self.sparse = [int(n) for n in sizes], dim, bool(sparse)
        seed = seed_from(seed, rng)
        for t, n in enumerate(self.sizes):
            setattr(self, f"table{t}", _table_parameter(table_rows(seed, t, n, 0, n, dim, dtype), self.sparse))

    def tables(self) -> list:
        return [getattr(self, f"table{t}") for t in range(len(self.sizes))]

    def forward(self, ids):
        ids = np.asarray(ids)
        err = _check_ids(ids, self.sizes)
        if err:
            raise IndexError(err)
        self._ids = ids
        return np.stack([w.data[ids[:, t]] for t, w in enumerate(self.tables())], axis=1)

    def backward(self, dy):
        for t, w in enumerate(self.tables()):
            ids, d = self._ids[:, t].astype(np.int64), np.ascontiguousarray(dy[:, t])
            if isinstance(w.grad, RowSparseGrad):  # the gradient's type decides (gradcheck swaps in a dense one)
                w.grad.add_(ids, d)
            else:
                K.embedding_bwd(ids, d, w.grad, -1)
        return None


# --------------------------------------------------------------------------- placements
# A placement: for every table t, blocks [(owner, first id, end id, offset in the owner's shard)].
SHARDINGS = Registry("embedding sharding")


@SHARDINGS.register("table")
def _table_wise(sizes, dim, p) -> list:
    load, out = [0] * p, [None] * len(sizes)
    for t in sorted(range(len(sizes)), key=lambda t: (-sizes[t], t)):  # LPT: largest first
        r = min(range(p), key=lambda r: (load[r], r))
        out[t] = [(r, 0, sizes[t], load[r])]
        load[r] += sizes[t]
    return out


@SHARDINGS.register("row")
def _row_wise(sizes, dim, p) -> list:
    out, load = [], [0] * p
    for n in sizes:
        blocks = []
        for r in range(p):
            lo, hi = r * n // p, (r + 1) * n // p  # the np.array_split blocks
            blocks.append((r, lo, hi, load[r]))
            load[r] += hi - lo
        out.append(blocks)
    return out


#: sharding name -> fn(table sizes, dim, ranks) -> placement


class ShardedEmbeddings(Module):
    """T embedding tables of `dim` columns sharded over `group`; forward(ids (B, T)) -> (B, T, dim).

    Collective: every rank of the group calls forward and backward together, each with its own
    (data-parallel) batch - batch sizes may differ, zero included.

    Args:
        sizes: rows of each table (the same list on every rank).
        dim: embedding width.
        group: the Group the tables are sharded over (default: the world) - also the group the
            dense layers are data-parallel over.
        sharding: "table" or "row" (``SHARDINGS``).
        rng: a Generator; one draw from it is the tables' seed (used when `seed` is None).
        dtype: the tables' dtype.
        algorithm: the AllToAll algorithm ("auto", "pairwise", "bruck", "mpi").
        seed: the tables' seed; each rank draws only its own rows, the values ``LocalEmbeddings``
            with the same seed holds (``embedding_init.py``). Must agree on every rank.
        sparse: the shard's gradient is row-sparse (``RowSparseGrad``) and optimizers update only
            the rows a step touched (lazy semantics, see ``optim.SGD`` / ``optim.Adam``); the same
            on every rank.

    Example:
        >>> emb = ShardedEmbeddings([1000, 50], 8, sharding="row", seed=0, sparse=True)
        >>> opt = optim.Adam(emb.parameters(), lr=1e-3)   # lazy Adam on the shard
    """

    def __init__(self, sizes, dim: int, group=None, sharding: str = "table", rng=None, dtype=np.float32,
                 algorithm: str = "auto", *, seed: int | None = None, sparse: bool = False):
        self.group = as_group(group)
        self.sizes, self.dim, self.sharding, self.algorithm = [int(n) for n in sizes], int(dim), sharding, algorithm
        self.sparse, err = bool(sparse), None
        if sharding not in SHARDINGS:
            err = f"unknown sharding {sharding!r}; choose one of {list(SHARDINGS)}"
        elif not self.sizes or min(self.sizes) < 1 or self.dim < 1:
            err = f"tables need at least one row and dim >= 1, got sizes {self.sizes} and dim {dim}"
        try:  # a bad seed on one rank must stop every rank, in the check below
            seed = seed_from(seed, rng)
        except ValueError as e:
            seed, err = None, err or str(e)
        # a rank with another seed or sparse setting would silently train a different model
        validate.check(self.group.comm, "ShardedEmbeddings", dict(sizes=tuple(self.sizes), dim=self.dim,
                                                                   sharding=sharding, dtype=np.dtype(dtype).str,
                                                                   seed=seed, sparse=self.sparse), err, always=True)
        p, me = self.group.size, self.group.rank
        self.placement = SHARDINGS[sharding](self.sizes, self.dim, p)
        shard = np.empty((self.owned_rows(me), self.dim), dtype)
        for t, blocks in enumerate(self.placement):  # only this rank's rows are ever drawn
            for r, lo, hi, off in blocks:
                if r == me:
                    table_rows(seed, t, self.sizes[t], lo, hi, self.dim, dtype, out=shard[off:off + hi - lo])
        # each block of this rank's rows is rows lo:hi of global table t, named "<path>.table<t>"
        # like LocalEmbeddings' tables: checkpoints reshard table-wise <-> row-wise <-> one process
        layout = [Piece(f"table{t}", (n, self.dim), ((lo, hi), (0, self.dim)), rows=(off, off + hi - lo))
                  for t, (n, blocks) in enumerate(zip(self.sizes, self.placement))
                  for r, lo, hi, off in blocks if r == me and hi > lo]
        self.shard = _table_parameter(shard, self.sparse, replicated=False, layout=layout)
        # Vectorised lookup of (owner, shard row) for global row g = table_offset[t] + id.
        self._table_offset = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        starts, owners, shard_offsets = [], [], []
        for t, blocks in enumerate(self.placement):
            for r, lo, hi, off in blocks:
                if hi > lo:
                    starts.append(self._table_offset[t] + lo)
                    owners.append(r)
                    shard_offsets.append(off - lo - self._table_offset[t])
        self._block_start = np.array(starts, np.int64)
        self._block_owner = np.array(owners, np.int64)
        self._block_shift = np.array(shard_offsets, np.int64)  # shard row = global row + shift
        # what the AllToAlls moved on this rank since stats.reset() (benchmarks, tests, metrics)
        self.stats = Counters("lookups", "rows_sent", "id_bytes", "fwd_bytes", "bwd_bytes", "alltoalls")

    def owned_rows(self, rank: int | None = None) -> int:
        """Rows of all tables that `rank` (default: this one) holds."""
        r = self.group.rank if rank is None else rank
        return sum(hi - lo for blocks in self.placement for o, lo, hi, _ in blocks if o == r)

    # ------------------------------------------------------------------------ forward
    def forward(self, ids):
        ids = np.asarray(ids)
        err = _check_ids(ids, self.sizes)
        # one tiny allreduce: a bad id on any rank stops every rank before the AllToAlls pair up
        validate.check(self.group.comm, "ShardedEmbeddings.forward", dict(tables=len(self.sizes)), err)
        B, T = ids.shape
        g = (ids.astype(np.int64) + self._table_offset[:T]).reshape(-1)
        uniq, inv = np.unique(g, return_inverse=True)  # sorted global rows
        blk = np.searchsorted(self._block_start, uniq, side="right") - 1
        owner = self._block_owner[blk]
        order = np.argsort(owner, kind="stable")  # group requests by owner
        splits = np.bincount(owner, minlength=self.group.size)
        req, recv_splits = C.alltoall((uniq + self._block_shift[blk])[order], splits, algorithm=self.algorithm, group=self.group)
        recv_splits = np.asarray(recv_splits, np.int64)
        vals, _ = C.alltoall(self.shard.data[req], recv_splits, algorithm=self.algorithm, group=self.group)
        pos = np.empty_like(order)
        pos[order] = np.arange(order.size)  # unique row k arrived at vals[pos[k]]
        slot = pos[inv].astype(np.int64, copy=False)  # lookup i's row is vals[slot[i]]
        self._cache = (B, T, slot, order.size, splits, req)
        s = self.stats
        s.lookups += g.size
        s.rows_sent += int(recv_splits.sum())
        s.id_bytes += int(splits.sum()) * 8
        s.fwd_bytes += int(recv_splits.sum()) * self.dim * self.shard.data.itemsize
        s.alltoalls += 2
        return vals[slot].reshape(B, T, self.dim)

    # ----------------------------------------------------------------------- backward
    def backward(self, dy):
        B, T, slot, n_uniq, splits, req = self._cache
        dy = np.ascontiguousarray(dy, dtype=self.shard.data.dtype)
        err = None if dy.shape == (B, T, self.dim) else (f"ShardedEmbeddings.backward: gradient shape {dy.shape} "
                                                           f"!= output shape {(B, T, self.dim)}")
        # as in forward: a wrong gradient on one rank must stop every rank, not strand them in the AllToAll
        validate.check(self.group.comm, "ShardedEmbeddings.backward", dict(tables=T), err)
        # sum the gradient of every occurrence of a row, in the order the rows were requested
        d_uniq = np.zeros((n_uniq, self.dim), dy.dtype)
        K.embedding_bwd(slot, dy.reshape(-1, self.dim), d_uniq, -1)
        d_req, _ = C.alltoall(d_uniq, splits, algorithm=self.algorithm, group=self.group)
        # average over the group, as DataParallel averages the dense layers' gradients
        d_req *= d_req.dtype.type(1.0 / self.group.size)
        req = req.astype(np.int64, copy=False)
        if isinstance(self.shard.grad, RowSparseGrad):  # rows several ranks asked for are summed once here
            self.shard.grad.add_(req, d_req)
        else:
            K.embedding_bwd(req, d_req, self.shard.grad, -1)
        self.stats.bwd_bytes += d_uniq.nbytes
        self.stats.alltoalls += 1
        return None

    # ---------------------------------------------------------------------- inspection
    def full_tables(self) -> list:
        """Collective: every table assembled from its owners' shards (checkpoints, tests)."""
        # the set-up check first: a rank that called this alone waited in the (untracked) allgather
        # for good while its peers waited in their next call (attack9); now every rank raises
        validate.check(self.group.comm, "ShardedEmbeddings.full_tables", {}, None, always=True)
        shards = self.group.comm.allgather(self.shard.data)
        out = [np.empty((n, self.dim), self.shard.data.dtype) for n in self.sizes]
        for t, blocks in enumerate(self.placement):
            for r, lo, hi, off in blocks:
                out[t][lo:hi] = shards[r][off:off + hi - lo]
        return out
