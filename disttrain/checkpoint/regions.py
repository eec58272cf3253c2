"""Copying the overlap of two regions of one global array: the core of resharding.

A region (``nn.layout``) is a box of the global array, optionally narrowed to a range of the
box's C-order flattening. A saved region's values are stored box-shaped (no range) or as the 1-D
range; a live region's array (``Shard.data``) has the same convention. ``copy_overlap`` copies
whatever elements the two have in common into the live array and marks them in a coverage mask,
so that the reader can prove every live element was filled (and name the first one that was not).

The common cases are plain slice copies: box/box (tensor-parallel blocks, embedding rows,
whole arrays), range/range within the same box (ZeRO ranges of one parameter, resharded to
another rank count), and a range against a block of whole rows of its box (ZeRO ranges <->
row blocks or whole arrays: whole rows are one range of the flattening). Every other combination (a ZeRO range of a tensor-parallel block read from
whole arrays, ...) goes through global element indices, a bounded chunk of rows at a time.
"""
from __future__ import annotations

import numpy as np

_CHUNK = 1 << 20  # elements per chunk of the general path: bounds its index arrays (~8 B each per dim)


def intersect(a: tuple, b: tuple) -> tuple | None:
    """The intersection of two boxes, or None when it is empty."""
    out = tuple((max(s0, s1), min(e0, e1)) for (s0, e0), (s1, e1) in zip(a, b))
    return out if all(s < e for s, e in out) else None


def _rows_of(box: tuple, flat: tuple | None) -> tuple:
    """The range of dim-0 rows of `box` that the flat range touches (all rows without a range)."""
    if flat is None:
        return box[0]
    per_row = int(np.prod([e - s for s, e in box[1:]], dtype=np.int64))
    s0 = box[0][0]
    return (s0 + flat[0] // per_row, s0 + (flat[1] - 1) // per_row + 1) if flat[1] > flat[0] else (s0, s0)


def normalise(box: tuple, flat: tuple | None, data: np.ndarray):
    """(box, flat, data) with a 0-d array seen as a 1-element 1-d one: every path below needs a dim."""
    box = tuple(tuple(int(v) for v in se) for se in box)
    flat = tuple(int(v) for v in flat) if flat is not None else None
    if box == ():
        return ((0, 1),), flat, data.reshape(1)
    return box, flat, data


def copy_overlap(dst_box, dst_flat, dst: np.ndarray, dst_covered: np.ndarray,
                 src_box, src_flat, src: np.ndarray) -> int:
    """Copy the elements the saved region (src_box, src_flat; values `src`) shares with the live
    region (dst_box, dst_flat; array `dst`, filled in place) and set them in `dst_covered` (a flat
    bool mask of dst.size). Returns how many elements the regions share (0: no overlap)."""
    box = intersect(dst_box, src_box)
    if box is None:
        return 0
    if dst_flat is None and src_flat is None:  # block of a block: one slice copy
        dsl = tuple(slice(s - d0, e - d0) for (s, e), (d0, _) in zip(box, dst_box))
        ssl = tuple(slice(s - s0, e - s0) for (s, e), (s0, _) in zip(box, src_box))
        dst[dsl] = src[ssl]
        dst_covered.reshape(dst.shape)[dsl] = True
        return int(np.prod([e - s for s, e in box], dtype=np.int64))
    if dst_flat is None and src_flat is not None and _whole_rows(dst_box, src_box):
        # a block of whole rows is a range of the other box's flattening: range/range
        a, b = dst_box[0]
        dst_flat, dst, dst_covered, dst_box = _rows_range(box, src_box), dst[box[0][0] - a:box[0][1] - a].reshape(-1), \
            dst_covered.reshape(b - a, -1)[box[0][0] - a:box[0][1] - a].reshape(-1), src_box
    elif src_flat is None and dst_flat is not None and _whole_rows(src_box, dst_box):
        a = src_box[0][0]
        src_flat, src, src_box = _rows_range(box, dst_box), src[box[0][0] - a:box[0][1] - a].reshape(-1), dst_box
    if dst_flat is not None and src_flat is not None and tuple(dst_box) == tuple(src_box):
        lo, hi = max(dst_flat[0], src_flat[0]), min(dst_flat[1], src_flat[1])
        if lo >= hi:
            return 0
        dst[lo - dst_flat[0]:hi - dst_flat[0]] = src[lo - src_flat[0]:hi - src_flat[0]]
        dst_covered[lo - dst_flat[0]:hi - dst_flat[0]] = True
        return hi - lo
    return _copy_general(box, dst_box, dst_flat, dst, dst_covered, src_box, src_flat, src)


def _whole_rows(block: tuple, outer: tuple) -> bool:
    """Whether `block` spans `outer`'s full extent in every dimension but the first (then any
    rows of it are one contiguous range of outer's C-order flattening)."""
    return tuple(block[1:]) == tuple(outer[1:])


def _rows_range(rows: tuple, outer: tuple) -> tuple:
    """The range of `outer`'s flattening that the whole rows `rows` (a box) occupy."""
    per_row = int(np.prod([e - s for s, e in outer[1:]], dtype=np.int64))
    return ((rows[0][0] - outer[0][0]) * per_row, (rows[0][1] - outer[0][0]) * per_row)


def _linear(grids, box, origin) -> np.ndarray:
    """C-order position within `box` of the global indices `grids` (offset by the chunk `origin`)."""
    ext = [e - s for s, e in box]
    idx = np.zeros(grids[0].shape, np.int64)
    for g, o, (s, _), n in zip(grids, origin, box, ext):
        idx *= n
        idx += g + (o - s)
    return idx.reshape(-1)


def _copy_general(box, dst_box, dst_flat, dst, dst_covered, src_box, src_flat, src) -> int:
    # rows of the intersection that either range can touch at all
    r0 = max(box[0][0], _rows_of(dst_box, dst_flat)[0], _rows_of(src_box, src_flat)[0])
    r1 = min(box[0][1], _rows_of(dst_box, dst_flat)[1], _rows_of(src_box, src_flat)[1])
    per_row = int(np.prod([e - s for s, e in box[1:]], dtype=np.int64))
    step = max(1, _CHUNK // max(1, per_row))
    dflat, sflat = dst.reshape(-1), src.reshape(-1)
    shared = 0
    for a in range(r0, r1, step):
        sub = ((a, min(a + step, r1)),) + tuple(box[1:])
        grids = np.indices([e - s for s, e in sub], dtype=np.int64)
        origin = [s for s, _ in sub]
        ld, ls = _linear(grids, dst_box, origin), _linear(grids, src_box, origin)
        keep = np.ones(ld.shape, bool)
        for lin, fl in ((ld, dst_flat), (ls, src_flat)):
            if fl is not None:
                keep &= (lin >= fl[0]) & (lin < fl[1])
        di = ld[keep] - (dst_flat[0] if dst_flat is not None else 0)
        si = ls[keep] - (src_flat[0] if src_flat is not None else 0)
        dflat[di] = sflat[si]
        dst_covered[di] = True
        shared += int(di.size)
    return shared
