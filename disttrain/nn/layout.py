"""Where a parameter's values sit in the global arrays of the model it is a part of.

A rank of a model-parallel or sharded run holds pieces of the model's arrays: a tensor-parallel
linear holds a block of columns of the full weight, a sharded embedding holds rows of several
tables in one array, a ZeRO shard holds a contiguous range of a flattened parameter. Checkpoints
must describe each piece in terms of the *global* array - its name, its full shape and the region -
so that a checkpoint written under one layout (ranks, dp x pp x tp, shard mode, embedding
placement) can be read under any other: the reader asks for the regions it holds now and gets them
from whichever files hold them (the idea of PyTorch's Distributed Checkpoint and DeepSpeed's
universal checkpoints).

A region is a box of the global array (a (start, stop) pair per dimension), optionally narrowed to
a range of that box's C-order flattening - the one form that describes all of the above, composed
too (a ZeRO range of a tensor-parallel block).

``Parameter.layout`` is None for a whole array named by the parameter's name (the common case), or
a list of Pieces: which global array, which region, and which rows of ``p.data`` hold it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Piece:
    """One region of one global array, held in (some rows of) a parameter's data.

    Attributes:
        key: the global array's name relative to the parameter's: None is the parameter's own name
            ("layers.0.weight"); a string replaces the name's last component ("emb.shard" with key
            "table3" -> "emb.table3"), since names are assigned after construction.
        shape: the global array's full shape.
        box: ((start, stop), ...) per dimension of the global array.
        flat: None, or (start, stop) within the C-order flattening of the box.
        rows: None (the whole of ``p.data``), or (lo, hi): ``p.data[lo:hi]`` holds this piece.
    """

    key: str | None
    shape: tuple
    box: tuple
    flat: tuple | None = None
    rows: tuple | None = None

    def name(self, param_name: str) -> str:
        if self.key is None:
            return param_name
        head, _, _ = param_name.rpartition(".")
        return f"{head}.{self.key}" if head else self.key

    @property
    def size(self) -> int:
        if self.flat is not None:
            return self.flat[1] - self.flat[0]
        return int(np.prod([b - a for a, b in self.box], dtype=np.int64))


def whole(shape) -> tuple:
    """The box covering all of an array of `shape`."""
    return tuple((0, int(n)) for n in shape)


@dataclass
class Shard:
    """A piece of a named global array with this rank's values: what a checkpoint writes, and on
    loading the array it fills in place (``data`` is a view of the live state)."""

    name: str
    shape: tuple
    box: tuple
    flat: tuple | None
    data: np.ndarray


def pieces(p) -> list:
    """The parameter's pieces (a whole-array piece when ``p.layout`` is None)."""
    return p.layout if p.layout is not None else [Piece(None, tuple(p.data.shape), whole(p.data.shape))]


def shards(p, array: np.ndarray | None = None, prefix: str = "") -> list:
    """Shards of `array` (default ``p.data``; an optimizer buffer of the parameter's shape works
    the same) under the global names of the parameter's pieces, each prefixed by `prefix`."""
    a = p.data if array is None else array
    out = []
    for pc in pieces(p):
        part = a if pc.rows is None else a[pc.rows[0]:pc.rows[1]]
        if pc.flat is not None:
            view = part.reshape(-1)
        else:
            view = part.reshape(tuple(b - s for s, b in pc.box))
        if view.size and not np.shares_memory(view, a):  # a copy would drop a checkpoint's values (empty: nothing)
            raise ValueError(f"parameter {p.name!r}: its array is not contiguous, so a piece cannot be a view")
        if view.size != pc.size:
            raise ValueError(f"parameter {p.name!r}: piece {pc} needs {pc.size} values but holds {view.size}")
        out.append(Shard(prefix + pc.name(p.name), pc.shape, pc.box, pc.flat, view))
    return out
