"""The Module protocol: layers as explicit forward/backward pairs (no autograd).

    y = m.forward(x)        # caches what backward needs
    dx = m.backward(dy)     # accumulates parameter grads (+=), returns the input grad
    m.parameters()          # [Parameter] in a stable order, each with .data, .grad, .name

    dx = m.backward_input(dy)   # B: the input gradient only (zero-bubble pipelines)
    m.backward_weight()         # W: then the parameter gradients of that same backward

``backward`` is B then W. The split (Qi et al. 2023, "Zero Bubble Pipeline Parallelism") lets a
pipeline send dx upstream as soon as B is done and run W later, in what would be idle time. A layer
that does not split keeps the defaults: ``backward_input`` runs the whole ``backward`` (parameter
gradients included) and ``backward_weight`` does nothing - correct for every layer, only less
schedulable. Splitting layers keep what W needs (their input and dy) between the two calls.

Names are attribute paths ("layers.0.weight"), assigned when ``parameters()`` is first called, so
they are stable across runs and ranks - what checkpoints and error-feedback state key on.
Containers report each child's gradients as ready the moment its backward returns (the hook
DataParallel uses to start a bucket's allreduce while earlier layers are still differentiating).
"""
from __future__ import annotations

import numpy as np

from .. import timeline


class Parameter:
    """A trainable array and its gradient (same shape and dtype).

    ``replicated`` (default True): data-parallel ranks hold copies of it, so DataParallel averages
    its gradient and ``broadcast_parameters`` copies it. A model-parallel shard that only this rank
    holds and whose layer completes its gradient itself (sharded embeddings over AllToAll) sets it
    False: averaging or overwriting it with another rank's shard would be wrong.

    ``layout`` (default None: the whole of the global array named ``name``): the pieces of global
    arrays this rank's ``data`` holds (``disttrain.nn.layout``) - set by model-parallel layers, read
    by checkpoints so that they reshard to any other layout.
    """

    __slots__ = ("data", "grad", "name", "replicated", "layout")

    def __init__(self, data: np.ndarray, name: str = "", replicated: bool = True, layout: list | None = None):
        self.data = np.ascontiguousarray(data)
        self.grad = np.zeros_like(self.data)
        self.name = name
        self.replicated = replicated
        self.layout = layout

    def __repr__(self) -> str:
        return f"Parameter({self.name!r}, shape={self.data.shape}, dtype={self.data.dtype})"


class Module:
    """Base class. Subclasses implement forward and backward; parameters are found by attribute."""

    training = True
    weight_state: tuple = ()  # attributes backward_weight reads (kept by a pipeline between B and W)
    _grad_hook = None  # callable(list[Parameter]) set by DataParallel on containers

    def forward(self, x):
        raise NotImplementedError

    def backward(self, dy):
        raise NotImplementedError

    def backward_input(self, dy):
        """B: the input gradient of a backward whose parameter gradients ``backward_weight`` adds.

        Args:
            dy: the gradient of the loss w.r.t. this module's last forward output.

        Returns:
            dx, as ``backward`` returns it. The default runs the whole ``backward`` (parameter
            gradients included), so layers that do not split stay correct.

        Example:
            >>> dx = layer.backward_input(dy); send(dx); layer.backward_weight()
        """
        return self.backward(dy)

    def backward_weight(self) -> None:
        """W: accumulate the parameter gradients of the last ``backward_input`` (default: nothing
        left to do - ``backward_input`` ran the whole backward)."""
        return None

    def __call__(self, x):
        return self.forward(x)

    def children(self):
        """(name, Module) pairs in attribute order (lists/tuples of modules are indexed)."""
        for k, v in vars(self).items():
            if isinstance(v, Module):
                yield k, v
            elif isinstance(v, (list, tuple)):
                for i, m in enumerate(v):
                    if isinstance(m, Module):
                        yield f"{k}.{i}", m

    def modules(self):
        """This module and every module below it, depth first (each once per path)."""
        yield self
        for _, m in self.children():
            yield from m.modules()

    def named_parameters(self, prefix: str = ""):
        for k, v in vars(self).items():
            if isinstance(v, Parameter):
                yield prefix + k, v
        for k, m in self.children():
            yield from m.named_parameters(f"{prefix}{k}.")

    def parameters(self) -> list:
        out = []
        for name, p in self.named_parameters():
            p.name = p.name or name
            out.append(p)
        return out

    def zero_grad(self) -> None:
        for p in self.parameters():
            flags = getattr(p.grad, "flags", None)  # (a row-sparse gradient has none and clears itself)
            if flags is None or flags.writeable:  # a sharded DataParallel's freed gradient is a read-only stand-in
                p.grad[...] = 0  # in place: DataParallel's bucket views must survive

    def train(self, mode: bool = True):
        self.training = mode
        for _, m in self.children():
            m.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def state_dict(self) -> dict:
        return {p.name: p.data.copy() for p in self.parameters()}

    def load_state_dict(self, state: dict) -> None:
        params = {p.name: p for p in self.parameters()}
        missing, extra = set(params) - set(state), set(state) - set(params)
        if missing or extra:
            raise KeyError(f"state_dict mismatch: missing {sorted(missing)}, unexpected {sorted(extra)}")
        for k, p in params.items():
            if state[k].shape != p.data.shape:
                raise ValueError(f"{k}: shape {state[k].shape} != {p.data.shape}")
            p.data[...] = state[k]

    def _grads_ready(self, child: "Module") -> None:
        if self._grad_hook is not None:
            self._grad_hook(child.parameters())


def _span(m: Module, what: str, i: int):
    """Timeline span for a leaf layer (containers are not recorded: their leaves are)."""
    if not timeline.enabled() or isinstance(m, Sequential):
        return timeline.NULL
    return timeline.span(f"{what} {i}.{type(m).__name__}", "layer")


class Sequential(Module):
    """Layers applied in order; backward runs them in reverse, reporting each child's grads ready."""

    def __init__(self, *layers: Module):
        self.layers = list(layers)

    # Each loop asks the timeline once per call, not once per layer: with the timeline off (the
    # default) a layer's call is just the call - a pipeline op runs these loops per micro-batch.
    def forward(self, x):
        spans = timeline.enabled()
        for i, m in enumerate(self.layers):
            if spans:
                with _span(m, "fwd", i):
                    x = m.forward(x)
            else:
                x = m.forward(x)
        return x

    def backward(self, dy):
        spans = timeline.enabled()
        for i in range(len(self.layers) - 1, -1, -1):
            m = self.layers[i]
            if spans:
                with _span(m, "bwd", i):
                    dy = m.backward(dy)
            else:
                dy = m.backward(dy)
            if self._grad_hook is not None:
                self._grads_ready(m)
            if dy is None and i > 0:  # the layers below would silently keep stale grads
                raise ValueError(f"layer {i} ({type(m).__name__}) returned no input gradient but is not "
                                 "the first layer; only the first layer may skip it (input_grad=False)")
        return dy

    def backward_input(self, dy):
        """B of every layer in reverse order (each splitting layer keeps its W for later)."""
        spans = timeline.enabled()
        for i in range(len(self.layers) - 1, -1, -1):
            m = self.layers[i]
            if spans:
                with _span(m, "bwd-input", i):
                    dy = m.backward_input(dy)
            else:
                dy = m.backward_input(dy)
            if dy is None and i > 0:
                raise ValueError(f"layer {i} ({type(m).__name__}) returned no input gradient but is not "
                                 "the first layer; only the first layer may skip it (input_grad=False)")
        return dy

    def backward_weight(self) -> None:
        """W of every layer; each child's gradients are reported ready as its W returns."""
        spans = timeline.enabled()
        for i in range(len(self.layers) - 1, -1, -1):
            m = self.layers[i]
            if spans:
                with _span(m, "bwd-weight", i):
                    m.backward_weight()
            else:
                m.backward_weight()
            if self._grad_hook is not None:
                self._grads_ready(m)

    def __getitem__(self, i):
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)
