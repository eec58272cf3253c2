#!/usr/bin/env bash
# disttrain across hosts without a batch system:
#
#   launchers/hostfile.sh HOSTFILE N PROGRAM_ARGS...     e.g. launchers/hostfile.sh hosts 8 -m disttrain.train
#
# HOSTFILE lists host:ranks lines (see hostfile.example); N is the total number of ranks. Hydra
# (the mpich wheel's mpiexec) starts the ranks over ssh and forwards the environment; the BLAS
# thread count defaults to 1 per rank (set OMP_NUM_THREADS to the cores each rank should use).
# With Open MPI set MPIEXEC=mpirun: this script then passes --hostfile and -x instead.
set -euo pipefail
hosts=${1:?usage: launchers/hostfile.sh HOSTFILE N PROGRAM_ARGS...}
n=${2:?usage: launchers/hostfile.sh HOSTFILE N PROGRAM_ARGS...}
shift 2
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-$OMP_NUM_THREADS} MKL_NUM_THREADS=${MKL_NUM_THREADS:-$OMP_NUM_THREADS}
launcher=${MPIEXEC:-mpiexec}
if "$launcher" --version 2>/dev/null | grep -q "Open MPI"; then
  exec "$launcher" --hostfile "$hosts" -n "$n" -x OMP_NUM_THREADS -x OPENBLAS_NUM_THREADS -x MKL_NUM_THREADS \
    -x PATH -x PYTHONPATH python "$@"
fi
exec "$launcher" -f "$hosts" -n "$n" -envall python "$@"
