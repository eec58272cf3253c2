"""Counter-based initialisation of embedding tables: any rank draws any row range, alone.

A recommender's tables can be larger than one rank's memory, so no rank may draw a whole table to
keep its rows. Each table is instead cut into fixed blocks of ``BLOCK_ROWS`` rows, and block ``b``
of table ``t`` is drawn from its own counter-based generator, Philox (Salmon et al. 2011, "Parallel
random numbers: as easy as 1, 2, 3") keyed by ``SeedSequence(seed, spawn_key=(t, b))``. Philox can
jump to any position of its stream (``advance``), so rows ``lo:hi`` are drawn without drawing the
rows before them. The values depend only on (seed, table, row) - never on the number of ranks, the
placement or the order ranks draw in - so a sharded model equals the one-process model
(``LocalEmbeddings``) exactly, table-wise, row-wise and at every process count.

Seeding semantics (changing any of them changes every table):

- row ``i`` of table ``t`` (``rows`` rows, ``dim`` columns) is the ``dim`` float64 values at
  positions ``(i % BLOCK_ROWS) * dim ...`` of the stream of
  ``Generator(Philox(SeedSequence(seed, spawn_key=(t, i // BLOCK_ROWS)))).random``;
- each value ``u`` in [0, 1) becomes ``bound * (2 u - 1)`` with ``bound = 1 / sqrt(rows)`` (DLRM's
  uniform initialisation, Naumov et al. 2019), computed in float64, then cast to the table's dtype.
"""
from __future__ import annotations

import numpy as np

#: rows per independently seeded block (part of the seeding semantics: fixed, never per run)
BLOCK_ROWS = 4096


def seed_from(seed=None, rng=None) -> int:
    """The tables' integer seed: `seed` itself, else one draw from `rng` (a Generator: the same
    generator state gives the same tables), else 0."""
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"the tables' seed must be a non-negative integer, got {seed!r}")
        return int(seed)
    if rng is not None:
        return int(rng.integers(0, 2 ** 63))
    return 0


def table_rows(seed: int, table: int, rows: int, lo: int, hi: int, dim: int, dtype=np.float32,
               out: np.ndarray | None = None) -> np.ndarray:
    """Rows ``lo:hi`` of table `table` (of `rows` rows and `dim` columns), as every rank draws them.

    Temporary memory is at most one block (``BLOCK_ROWS x dim`` float64), whatever the range.

    Args:
        seed: the tables' seed (``seed_from``).
        table: the table's index (its position in the model's list of tables).
        rows: the table's full row count (sets the initialisation bound).
        lo, hi: the row range, 0 <= lo <= hi <= rows.
        dim: columns.
        dtype: the result's dtype.
        out: optional (hi - lo, dim) array to fill (a slice of a shard: no extra copy).

    Returns:
        The (hi - lo, dim) rows.

    Example:
        >>> a = table_rows(0, 2, 100, 0, 100, 4)
        >>> np.array_equal(a[30:70], table_rows(0, 2, 100, 30, 70, 4))
        True
    """
    if not 0 <= lo <= hi <= rows:
        raise ValueError(f"row range {lo}:{hi} is not inside a table of {rows} rows")
    if out is None:
        out = np.empty((hi - lo, dim), dtype)
    elif out.shape != (hi - lo, dim):
        raise ValueError(f"out has shape {out.shape}, rows {lo}:{hi} need {(hi - lo, dim)}")
    bound = 1.0 / np.sqrt(rows)
    r = lo
    while r < hi:
        b = r // BLOCK_ROWS
        end = min(hi, (b + 1) * BLOCK_ROWS)
        gen = np.random.Generator(np.random.Philox(np.random.SeedSequence(seed, spawn_key=(table, b))))
        skip = (r - b * BLOCK_ROWS) * dim  # values of this block before row r
        gen.bit_generator.advance(skip // 4)  # one Philox counter step yields four 64-bit values
        if skip % 4:
            gen.random(skip % 4)
        u = gen.random((end - r) * dim).reshape(end - r, dim)
        u *= 2.0
        u -= 1.0
        u *= bound
        out[r - lo:end - lo] = u
        del u  # before the next block's draw: one block of temporaries at a time
        r = end
    return out
