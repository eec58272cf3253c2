"""Optimizer base: parameters, a learning rate a schedule may change, named per-parameter state.

A parameter whose ``.grad`` is row-sparse (``nn.sparse.RowSparseGrad``: embeddings built with
``sparse=True``) is updated by ``_update_rows`` - only its touched rows, with the optimizer's lazy
semantics (see its docstring) - and needs an optimizer with ``sparse = True``; others refuse it
when they are built, never half-way through a step.
"""
from __future__ import annotations

import numpy as np

from .. import timeline
from ..nn.sparse import RowSparseGrad


class Optimizer:
    #: True when the optimizer can apply row-sparse gradients (``_update_rows``)
    sparse = False
    #: True when the update of a parameter needs quantities of the whole tensor (LAMB's norms): a
    #: ZeRO-sharded DataParallel, whose ranks each hold a slice, refuses such an optimizer unless it
    #: takes the sums of partial norms through a ``norm_sums`` attribute (as LAMB does).
    whole_tensor_update = False

    def __init__(self, params, lr: float):
        self.params = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        if lr <= 0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        for i, p in enumerate(self.params):  # loose arrays handed in directly: name them by position
            p.name = p.name or f"param{i}"
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):  # state is keyed by name: a collision would share buffers
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"optimizer parameters need unique names (state is keyed by name), got duplicates "
                             f"{dup}: call parameters() on the root model first, which names every "
                             "parameter by its path")
        sparse = [p.name for p in self.params if isinstance(p.grad, RowSparseGrad)]
        if sparse and not self.sparse:
            raise ValueError(f"{type(self).__name__} cannot apply the row-sparse gradients of {sparse}: use SGD, "
                             "Adam / AdamW (lazy) or RowWiseAdagrad, or build the embeddings with sparse=False")
        self.lr = lr
        self.state: dict = {}  # parameter name -> {buffer name: array}; keyed by stable names
        self.steps = 0
        self._post_step_hooks: list = []

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad[...] = 0  # in place: DataParallel's bucket views must survive

    def step(self) -> None:
        self.steps += 1
        with timeline.span(f"{type(self).__name__}.step", "optim"):
            for p in self.params:
                st = self.state.setdefault(p.name, {})
                if isinstance(p.grad, RowSparseGrad):
                    self._update_rows(p, st, p.grad)
                else:
                    self._update(p, st)
        for fn in self._post_step_hooks:
            fn()

    def register_step_post_hook(self, fn) -> None:
        """Call ``fn()`` at the end of every ``step()`` (as torch.optim's hook of that name): a
        sharded DataParallel gathers the updated slices there, so the model is whole again."""
        self._post_step_hooks.append(fn)

    def _update(self, p, st: dict) -> None:
        raise NotImplementedError

    def _update_rows(self, p, st: dict, g: RowSparseGrad) -> None:
        """Update only rows ``g.rows`` of ``p.data`` (and of the state) from ``g.values``."""
        raise NotImplementedError

    @staticmethod
    def _rows(a: np.ndarray) -> np.ndarray:
        """A parameter-shaped array as the 2-D (rows, width) view the row kernels index."""
        return a.reshape(a.shape[0], int(np.prod(a.shape[1:], dtype=np.int64)))  # -1 fails on 0 rows

    def state_arrays(self) -> dict:
        """Flat {"param/buffer": array} view of the state (for broadcast and checkpoints)."""
        return {f"{k}/{b}": v for k, st in self.state.items() for b, v in st.items()}

    @staticmethod
    def _buf(st: dict, key: str, like: np.ndarray) -> np.ndarray:
        if key not in st:
            st[key] = np.zeros_like(like)
        elif st[key].shape != like.shape:  # the kernels index blindly: never hand them a mismatch
            raise ValueError(f"optimizer state {key!r} has shape {st[key].shape}, parameter has {like.shape}")
        return st[key]
