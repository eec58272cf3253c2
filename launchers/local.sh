#!/usr/bin/env bash
# Run a disttrain program on this machine with N ranks.
#
#   launchers/local.sh N PROGRAM.py [ARGS...]      e.g. launchers/local.sh 4 scripts/bench_collectives.py
#
# MPICH busy-polls in every rank. With as many ranks as cores or more (oversubscription, as on a
# 2-core laptop), spinning ranks steal the cores from the ranks doing work; these two settings
# make MPICH yield when it finds nothing to progress (DESIGN.md sec. 5). They are harmless with
# fewer ranks than cores and are not applied then. MPIEXEC overrides the launcher (e.g. a system
# MPI's mpiexec); Open MPI needs --oversubscribe to start more ranks than cores.
set -euo pipefail
n=${1:?usage: launchers/local.sh N PROGRAM.py [ARGS...]}
shift
if [ "$n" -ge "$(nproc)" ]; then
  export MPIR_CVAR_CH4_PROGRESS_THROTTLE=${MPIR_CVAR_CH4_PROGRESS_THROTTLE:-1}
  export MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT=${MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT:-1}
fi
# BLAS thread pools: N ranks x (one OpenBLAS/MKL thread per core) on one host oversubscribe the
# cores many times over and make small GEMMs ~100x slower (measured: the digits MLP goes from
# ~800 to ~80,000 samples/s at 2 ranks). Give each rank its share of the cores unless set.
share=$(( $(nproc) / n )); [ "$share" -ge 1 ] || share=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$share}
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-$OMP_NUM_THREADS}
export MKL_NUM_THREADS=${MKL_NUM_THREADS:-$OMP_NUM_THREADS}
launcher=${MPIEXEC:-mpiexec}
extra=()
if "$launcher" --version 2>/dev/null | grep -q "Open MPI"; then extra+=(--oversubscribe); fi
exec "$launcher" "${extra[@]}" -n "$n" python "$@"
