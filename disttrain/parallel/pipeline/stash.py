"""What a pipeline stage keeps of a micro-batch between its forward and its backward, and the
activation recomputation that trades that memory for a second forward.

Layers keep what backward needs in their own attributes (``self._x`` ...); with several
micro-batches in flight the runtime *stashes* those attributes after each forward and puts them
back before that micro-batch's backward (``state``/``restore``). Between a split backward's B and
its W only what W reads is kept (``weight_state``: each layer's ``Module.weight_state`` names).

Recomputation (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"; Korthikanti et al.
2022 for pipelines) keeps only inputs and runs the forward again just before the backward:

- ``full``: only the chunk's input per micro-batch; the whole chunk is recomputed at once before
  its backward (transient: one micro-batch's activations of the whole chunk).
- ``selective``: the input of every unit (each layer of the chunk's Sequential: an MLP block, a
  transformer block); the backward runs unit by unit, each recomputed just before its own backward
  (transient: one unit's activations; kept: the unit boundaries).

Random layers (Dropout) must draw the same mask again: the NumPy Generators found in the modules'
attributes are rewound to their state at the original forward and put forward again afterwards,
so the result is bit-identical to no recomputation.
"""
from __future__ import annotations

from operator import itemgetter

import numpy as np

from ...nn.module import Module, Parameter, Sequential

RECOMPUTE = ("none", "full", "selective")


def _nbytes(v) -> int:
    if isinstance(v, np.ndarray):
        return v.nbytes
    if isinstance(v, (tuple, list)):
        return sum(a.nbytes for a in v if isinstance(a, np.ndarray))
    return 0


def _structural(v) -> bool:
    """Whether an attribute is part of the model's structure (never stashed): a parameter, a
    module, a list of modules, DataParallel's gradient hook."""
    return (isinstance(v, (Parameter, Module)) or (isinstance(v, (list, tuple)) and bool(v) and
                                                    isinstance(v[0], Module)) or callable(v))


class Plan:
    """What to stash of a chunk, worked out once instead of per micro-batch (the per-op runtime
    work of issue 19, item 4): its modules (walking the tree every op cost more than the stash),
    the modules that keep anything, with the names of their non-structural attributes and a
    C-level getter for them (worked out again only when the modules' attribute count changes: a
    first forward creates the caches; or when a stashed name is gone: a module swapped it for
    another, same count), and the modules whose W keeps state. Not seen: a module that swaps a
    structural attribute (a parameter, a module, a callable) for a cache at the same count.

    Args:
        chunk: the Module whose tree is stashed (None with `modules`).
        modules: an explicit list of objects to stash instead (a loss function, one unit).
    """

    def __init__(self, chunk: Module | None, modules: list | None = None):
        self.modules = list(chunk.modules()) if modules is None else list(modules)
        self.split = [m for m in self.modules if getattr(m, "weight_state", ())]
        self._dicts = [vars(m) for m in self.modules]
        self._count = -1  # attributes over all modules when `_holders` was worked out
        self._holders = []  # (attribute dict, names to stash, getter, one name?) of each module with any

    def _classify(self) -> None:
        self._holders = []
        for d in self._dicts:
            names = tuple(k for k, v in d.items() if not (k.startswith("__") or _structural(v)))
            if names:  # itemgetter of one name returns the value itself, of several a tuple
                self._holders.append((d, names, itemgetter(*names), len(names) == 1))
        self._count = sum(map(len, self._dicts))

    def state(self) -> tuple:
        """(saved, bytes): every non-parameter, non-module attribute of each module - the
        activations the module keeps for its backward - and their bytes."""
        # one C-level count over every module's attributes tells whether any module gained or lost
        # one (a first forward creates the caches): only then are they classified again
        if sum(map(len, self._dicts)) != self._count:
            self._classify()
        try:
            return self._state()
        except KeyError:  # a module swapped a cache for another of a new name: same count
            self._classify()
            return self._state()

    def _state(self) -> tuple:
        saved, nbytes = [], 0
        for d, names, get, single in self._holders:
            values = (get(d),) if single else get(d)
            saved.append((d, names, values))
            for v in values:
                nbytes += v.nbytes if type(v) is np.ndarray else _nbytes(v)
        return saved, nbytes


def state(modules) -> tuple:
    """(saved, bytes) of `modules` (a one-off ``Plan``: recomputation's transient bytes)."""
    return Plan(None, modules).state()


def weight_state(modules) -> tuple:
    """(saved, bytes): only the attributes each module's backward_weight reads (after its B)."""
    saved, nbytes = [], 0
    for m in modules:
        if m.weight_state:
            d = vars(m)
            values = tuple(d[k] for k in m.weight_state)
            nbytes += sum(_nbytes(v) for v in values)
            saved.append((d, m.weight_state, values))
    return saved, nbytes


def restore(saved) -> None:
    """Put stashed attributes back (``Plan.state`` / ``weight_state``'s saved form)."""
    for d, names, values in saved:
        d.update(zip(names, values))


def units(chunk: Module) -> list:
    """The recomputation units of a chunk: its Sequential's layers, or the chunk as one unit."""
    return list(chunk.layers) if isinstance(chunk, Sequential) else [chunk]


def rng_state(module: Module) -> list:
    """The (Generator, state) of every NumPy Generator in the module's layers (Dropout's rng)."""
    return [(v, v.bit_generator.state) for m in module.modules() for v in vars(m).values()
            if isinstance(v, np.random.Generator)]


def rewind(states) -> list:
    """Set each Generator to its saved state; return their current states (to put back)."""
    now = [(g, g.bit_generator.state) for g, _ in states]
    for g, st in states:
        g.bit_generator.state = st
    return now


def forward(chunk: Module, x, mode: str) -> tuple:
    """Forward the chunk; returns (y, what to keep for recomputation: None for "none")."""
    if mode == "none":
        return chunk.forward(x), None
    if mode == "full":
        rng = rng_state(chunk)
        return chunk.forward(x), [(chunk, x, rng)]
    kept = []
    for u in units(chunk):
        kept.append((u, x, rng_state(u)))
        x = u.forward(x)
    return x, kept


def kept_bytes(kept) -> int:
    return sum(_nbytes(x) for _, x, _ in kept)


def recompute(unit: Module, x, rng) -> int:
    """Run the unit's forward again on its kept input with the original random draws; returns the
    bytes of activations it re-created (the transient cost of recomputation)."""
    later = rewind(rng)
    unit.forward(x)
    rewind(later)
    return state(unit.modules())[1]
