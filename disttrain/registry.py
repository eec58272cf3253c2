"""One idiom for every name -> implementation table: collective algorithms (comm/registry.py),
compressors, pipeline schedules, embedding shardings, batching strategies, workloads, optimizers.

    SCHEDULES = Registry("pipeline schedule")

    @SCHEDULES.register("gpipe")
    def _gpipe(s, p, m): ...

    SCHEDULES["gpipe"]; "gpipe" in SCHEDULES; list(SCHEDULES); SCHEDULES.problem(name)

A name may carry one parameter after a colon ("ps:2", "topk:0.01"): ``split(name)`` is the one
place that parses it, and ``problem(name)`` says what is wrong with a name (None if it is valid) in
a message that lists the choices - the same for every family, so tests and benchmarks loop over
``names()`` and a new member is one decorated function or class.
"""
from __future__ import annotations


def split(name: str) -> tuple[str, str]:
    """("ps", "2") for "ps:2"; ("ring", "") for "ring"."""
    base, _, param = name.partition(":")
    return base, param


class Registry:
    """A table of named implementations of one family (functions or classes)."""

    def __init__(self, what: str):
        self.what = self.family = what  # `what`: how messages name a member ("pipeline schedule")
        self._fns: dict = {}

    def register(self, name: str, *, takes_param: bool = False):
        """Decorator: add the function or class under `name` (`takes_param`: accepts "name:param")."""
        def deco(fn):
            fn.takes_param = takes_param or getattr(fn, "takes_param", False)
            self._fns[name] = fn
            return fn

        return deco

    def names(self) -> tuple:
        return tuple(self._fns)

    def __iter__(self):
        return iter(self._fns)

    def __len__(self) -> int:
        return len(self._fns)

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and name in self._fns

    def __getitem__(self, name: str):
        fn = self._fns.get(name)
        if fn is None:
            raise KeyError(self.problem(name) or name)
        return fn

    def get(self, name: str, default=None):
        return self._fns.get(name, default)

    def items(self):
        return self._fns.items()

    def problem(self, name, allow: tuple = ()) -> str | None:
        """Why `name` is not a valid member (None if it is); `allow`: extra accepted names ("auto")."""
        if not isinstance(name, str):
            return f"{self.what} must be a str, got {type(name).__name__}"
        base, param = split(name)
        fn = self._fns.get(base)
        if fn is None and base not in allow:
            return f"unknown {self.what} {name!r}; choose one of {[*allow, *self._fns]}"
        if param and (fn is None or not fn.takes_param):
            return f"{self.what} {base!r} takes no parameter (got {name!r})"
        return None
