"""The one door to ``mpi4py.MPI``, opened on first use.

Why lazily: importing ``mpi4py.MPI`` starts MPI (MPI_Init_thread) by mpi4py's default, and
``import disttrain`` must not - the command-line tools (``python -m disttrain.flight``,
``python -m disttrain.checkpoint``, ``--help``) run without a launcher, and a user may set
``mpi4py.rc`` before ``dt.init()``. So every module imports this one at its top (``from . import
mpi``) and reads ``mpi.MPI`` inside its functions; the import happens here, once, with an error that
says what to install when no MPI library can be loaded. This is the library's only deferred import
of mpi4py.
"""
from __future__ import annotations


def __getattr__(name: str):
    if name != "MPI":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        from mpi4py import MPI  # deferred on purpose: see the module docstring
    except (ImportError, RuntimeError) as e:  # mpi4py's wheel found no MPI library to load
        raise RuntimeError(f"disttrain: no usable MPI library ({e}). Install the embedded one with "
                           "pip install 'disttrain[mpich]' (or pip install mpich), or a system MPI "
                           "(README: Using a system MPI).") from e
    globals()["MPI"] = MPI  # later reads are plain attribute lookups
    return MPI
