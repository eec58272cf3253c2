"""Row-wise Adagrad (Duchi et al. 2011, with one accumulator per row): the optimizer DLRM's
embedding tables are usually trained with (Naumov et al. 2019; FBGEMM's "rowwise adagrad"),
because its state is one number per row instead of one per weight."""
from __future__ import annotations

import numpy as np

from .optimizer import Optimizer
from .rowwise import adagrad_rows


class RowWiseAdagrad(Optimizer):
    """Adagrad with one accumulator per row (the first axis; a 1-D parameter's every element is a row).

    ``d = g + wd * w``;  ``s[r] += mean_j d[r, j]^2``;  ``w[r] -= lr * d[r] / (sqrt(s[r]) + eps)``.

    Dense and row-sparse gradients take the same kernel (a dense one visits every row). An
    untouched row has a zero gradient, so - without weight decay - the lazy update of a row-sparse
    gradient equals the dense one. The state "row_sum" has shape (rows, 1): one value per row,
    not the parameter's shape (so it is not a layout-shaped optimizer buffer).

    Args:
        params: the parameters.
        lr: learning rate.
        eps: added to sqrt(s) (FBGEMM's default 1e-8).
        weight_decay: L2, added to the gradient of the updated rows.

    Example:
        >>> from disttrain import nn
        >>> opt = RowWiseAdagrad(nn.Linear(4, 2).parameters(), lr=0.1)
    """

    sparse = True

    def __init__(self, params, lr: float = 0.01, eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, lr)
        self.eps, self.weight_decay = eps, weight_decay

    def _update(self, p, st):
        w = self._rows(p.data)
        self._apply(p, st, np.arange(w.shape[0], dtype=np.int64), self._rows(p.grad))

    def _update_rows(self, p, st, g):
        self._apply(p, st, g.rows, self._rows(g.values))

    def _apply(self, p, st, rows, g):
        w, f = self._rows(p.data), p.data.dtype.type
        s = self._buf(st, "row_sum", w[:, :1])
        adagrad_rows(w, rows, g, s, f(self.lr), f(self.eps), f(self.weight_decay))
