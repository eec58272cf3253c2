#!/usr/bin/env bash
# Elastic restarts of the main job: when a rank or a host dies, relaunch on the ranks that are left,
# from the newest valid checkpoint.
#
#   launchers/elastic.sh [--min-ranks N] [--max-ranks M] [--max-restarts K] [--hostfile F] -- [PYTHON] -m disttrain.train ARGS...
#   launchers/elastic.sh --min-ranks 2 --max-ranks 4 -- python -m disttrain.train --steps 1000 \
#       --checkpoint-dir ckpt --checkpoint-every 50 --metrics m.jsonl
#
# Options:
#   --min-ranks N     fewer usable ranks than N: give up (default 1)
#   --max-ranks M     never launch more than M ranks (default: the hostfile's slots, or this host's cores)
#   --max-restarts K  restart at most K times (default 3)
#   --hostfile F      MPICH Hydra hosts, "host[:slots]" per line (see hostfile.example), re-read at every
#                     (re)launch: hosts added since the last launch are used, dropped hosts are not.
#                     Without it: this host, M ranks.
# Environment: MPIEXEC (default mpiexec; MPICH's Hydra), PYTHON (when the program starts with -m).
#
# The program must be the main job; ARGS must include --checkpoint-dir (and --checkpoint-every N,
# or a restart goes back to the last checkpoint the job wrote). Its configuration is read with the
# job's own parser (python -m disttrain.elastic plan: flags and --config files alike) before anything
# is launched, so a configuration error is the job's message, once.
#
# What happens:
# 1. World size: the largest multiple of pp x tp (the mesh is dp x pp x tp; the job then picks
#    dp = world / (pp x tp)) that is at most min(M, usable slots). An explicit --dp (flag or config
#    file) sets the first launch's size, dp x pp x tp, which must fit in [N, M] and the slots (else
#    a clear refusal before launching); restarts adapt it: --dp is passed again with the new value.
# 2. Each rank runs under this script's --rank-wrapper, which records "start RANK PGID HOST" and
#    "exit RANK STATUS" in a per-launch records directory (on a file system the hosts share). A rank
#    killed by a signal is killed again by the same signal after the record is written, so mpiexec
#    still sees a killed process and tears the job down at once (~0.1 s measured), as without the
#    wrapper; the ranks it tears down die by SIGKILL without a record.
# 3. When mpiexec returns: status 0 -> done (exit 0), unless a rank that recorded its start has no
#    exit record: Hydra tore it down because another rank exited with status 0 mid-run (os._exit(0)
#    after MPI_Init, no MPI_Finalize) and returned that 0 - a failure attributed to the rank(s) that
#    exited 0 (they left the job). Otherwise the failure is attributed to ranks:
#    (a) a rank whose own process died by a signal (its "exit" record, status > 128);
#    (b) a rank that left the job while others waited for it, or that received a signal: the abort
#        line the job prints names it ("rank R has left the job", "rank R: received SIGTERM").
#    A rank's host is known from the placement this script launched with (Hydra places ranks in
#    blocks, in the order of the machine file written here: host:slots per line). If no rank is
#    named and some ranks have no "exit" record (their host went away with them), every host of the
#    launch is probed (mpiexec -hosts H -n 1 true, 30 s); hosts that fail are the failed ones. If every
#    rank exited on its own, or nothing can be attributed, it is the job's own verdict (configuration
#    error, non-finite gradients, an uncaught exception): no restart, exit with the job's status.
# 4. Before relaunching, every process group of the launch recorded on this host is checked and
#    killed (SIGKILL) if still alive, and waited for: nothing of the old job may share the new one's
#    cores or checkpoint directory.
# 5. Failed hosts are dropped for the rest of this launcher's life (with --hostfile; a failed host
#    stays out even if still listed). Without a hostfile the only host is this one: each failed rank
#    removes one slot instead (its core, memory or device is presumed bad), so a 4-rank job that
#    loses a rank continues on 3.
# 6. Relaunch with --resume if the checkpoint directory holds a valid checkpoint (the step comes from
#    python -m disttrain.elastic newest-step, the same choice the job's resume makes), else fresh.
#    Each restart is ONE line on stderr:
#      elastic: restart 1/3: rank 2 (host localhost) killed by signal 9; world 4 -> 3; resuming from step 20
#
# The global batch (--global-batch-size) stays the same at every world size: the fixed-batch
# workloads share it unevenly when the ranks do not divide it and weight the gradients by share, so
# the run continues the uninterrupted run's model up to the reduction order. (gnmt's naive / bucketed
# batching and --max-tokens budgets depend on dp: the job refuses to resume those at another dp.)
#
# The records live in a fresh directory under $TMPDIR (removed at exit); on several hosts TMPDIR must
# be a directory they all see, or only abort lines and host probes attribute failures. Hosts can be
# emulated on one machine without root: HYDRA_LAUNCHER=ssh HYDRA_LAUNCHER_EXEC=tests/fake_ssh.sh
# (each "host" a session of its own; tests/test_elastic.py kills one with all its processes).
#
# Exit status: the job's (0 on success, its own non-zero status for a failure that is not a rank or
# host failure); 64 usage or configuration error; 69 fewer than --min-ranks usable ranks; 75 the job
# failed again after --max-restarts restarts. SIGINT/SIGTERM stop the job and the launcher (130/143).
set -euo pipefail
self="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"

# ----------------------------------------------------------------- the rank wrapper (internal)
if [ "${1:-}" = "--rank-wrapper" ]; then
  shift
  r=${PMI_RANK:-${OMPI_COMM_WORLD_RANK:-unknown}}
  rec="${DTELASTIC_RECORDS:-/nonexistent}/rank-$r"
  set +e
  # records are best effort: a rank that cannot write one must still run (the others would wait
  # for it in MPI_Init forever); the launcher then attributes from abort lines and host probes
  { echo "start $r $(ps -o pgid= -p $$ | tr -d ' ') $(hostname)" >> "$rec"; } 2>/dev/null
  "$@"
  rc=$?
  { echo "exit $r $rc" >> "$rec"; } 2>/dev/null
  # died by a signal: die by it too - an exit status of 137 would be an ordinary exit to mpiexec,
  # which would then leave the other ranks waiting for this one instead of ending the job
  if [ "$rc" -gt 128 ]; then kill -s "$((rc - 128))" $$; fi
  exit "$rc"
fi

die() { echo "elastic: $1" >&2; exit "${2:-64}"; }
posint() {  # $1 = option, $2 = value, $3 = least allowed (default 1)
  if ! [[ "$2" =~ ^[0-9]+$ ]] || [ "$2" -lt "${3:-1}" ]; then die "$1 must be an integer >= ${3:-1} (got '$2')"; fi
}

min_ranks=1 max_ranks="" max_restarts=3 hostfile=""
while [ $# -gt 0 ]; do
  case "$1" in
    --min-ranks) min_ranks=${2:-}; posint --min-ranks "$min_ranks"; shift 2 ;;
    --max-ranks) max_ranks=${2:-}; posint --max-ranks "$max_ranks"; shift 2 ;;
    --max-restarts) max_restarts=${2:-}; posint --max-restarts "$max_restarts" 0; shift 2 ;;
    --hostfile) hostfile=${2:-}; [ -r "$hostfile" ] || die "--hostfile '$hostfile' is not a readable file"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,/^set -euo/{/^#/p}' "$self"; exit 0 ;;
    *) die "unknown option '$1' (see --help); put the program after --" ;;
  esac
done
[ $# -gt 0 ] || die "no program; usage: elastic.sh [options] -- [PYTHON] -m disttrain.train ARGS..."
if [ "$1" = "-m" ]; then set -- "${PYTHON:-python}" "$@"; fi
if [ $# -lt 3 ] || [ "$2" != "-m" ] || [ "$3" != "disttrain.train" ]; then
  die "the program must be the main job: [PYTHON] -m disttrain.train ARGS... (got: $*)"
fi
py=$1
shift 3
job_args=("$@")
[ -z "$max_ranks" ] || [ "$min_ranks" -le "$max_ranks" ] || die "--min-ranks $min_ranks exceeds --max-ranks $max_ranks"
launcher=${MPIEXEC:-mpiexec}
version=$("$launcher" --version 2>/dev/null || true)
case "$version" in *HYDRA*) ;; *) die "needs MPICH's Hydra mpiexec (found: $(command -v "$launcher" || echo "$launcher"))" ;; esac

plan=$("$py" -m disttrain.elastic plan "${job_args[@]}") || die "the job's configuration is refused (above); nothing launched"
read -r granule dp0 ckpt_dir <<< "$plan"
[ -n "$ckpt_dir" ] || die "elastic restarts resume from checkpoints: give the job --checkpoint-dir DIR (and --checkpoint-every N)"

run_dir=$(mktemp -d "${TMPDIR:-/tmp}/elastic.XXXXXX")
job_pid=""
stop_job() {  # the launcher is stopped: stop the job (its process group) and wait for it, then leave
  [ -n "$job_pid" ] || return 0
  kill -TERM -- "-$job_pid" 2>/dev/null || true
  wait "$job_pid" 2>/dev/null || true
  kill_leftovers
}
trap 'rm -rf "$run_dir"' EXIT
trap 'stop_job; exit 130' INT
trap 'stop_job; exit 143' TERM HUP
set -m  # each launch in its own process group: a signal to the launcher reaches the whole job

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-$OMP_NUM_THREADS} MKL_NUM_THREADS=${MKL_NUM_THREADS:-$OMP_NUM_THREADS}

declare -A dropped=()
local_slots=${max_ranks:-$(nproc)}
hosts=() slots=()
read_hosts() {  # the usable hosts and their slots: the hostfile now, minus dropped hosts
  hosts=() slots=()
  if [ -z "$hostfile" ]; then hosts=(localhost) slots=("$local_slots"); return; fi
  local line h n
  while IFS= read -r line || [ -n "$line" ]; do
    line=${line%%#*}; line=${line//[[:space:]]/}
    [ -n "$line" ] || continue
    h=${line%%:*}; n=1
    [[ "$line" != *:* ]] || n=${line#*:}
    [[ "$n" =~ ^[0-9]+$ ]] || die "hostfile $hostfile: bad line '$line' (want host[:slots])"
    [ -z "${dropped[$h]:-}" ] || continue
    hosts+=("$h") slots+=("$n")
  done < "$hostfile"
}

rank_host=()
place() {  # $1 = world: machine file for Hydra (block placement in hostfile order) and rank -> host
  local left=$1 i take r=0
  rank_host=()
  : > "$run_dir/machinefile"
  for i in "${!hosts[@]}"; do
    [ "$left" -gt 0 ] || break
    take=${slots[$i]}; [ "$take" -le "$left" ] || take=$left
    [ "$take" -gt 0 ] || continue
    echo "${hosts[$i]}:$take" >> "$run_dir/machinefile"
    for ((k = 0; k < take; k++)); do rank_host[r]=${hosts[$i]}; r=$((r + 1)); done
    left=$((left - take))
  done
}

choose_world() {  # -> $world, or exit 69 naming what is missing
  local avail=0 n cap
  for n in "${slots[@]}"; do avail=$((avail + n)); done
  cap=$avail; [ -z "$max_ranks" ] || [ "$cap" -le "$max_ranks" ] || cap=$max_ranks
  world=$((cap - cap % granule))
  local where="on ${hosts[*]:-no hosts}"
  [ -n "$hostfile" ] || where="on this host"
  if [ "$world" -lt "$min_ranks" ] || [ "$world" -lt 1 ]; then
    die "giving up${why:+ after $why}: $avail usable rank(s) $where (--max-ranks ${max_ranks:-none}, multiples of pp x tp = $granule) give $world, fewer than --min-ranks $min_ranks" 69
  fi
}

torn_down() {  # ranks that recorded a start but no exit (records are best effort: no start, no verdict)
  local r
  for ((r = 0; r < world; r++)); do
    grep -q '^start ' "$records/rank-$r" 2>/dev/null && ! grep -q '^exit ' "$records/rank-$r" 2>/dev/null && printf '%s ' "$r"
  done
  return 0
}

attribute() {  # after a failed launch: $why, $failed_hosts (with a hostfile) / $lost_slots; 1 if none
  local rec st r sig all_exited=1
  why="" failed_hosts=() lost_slots=0
  declare -A seen=()
  for ((r = 0; r < world; r++)); do
    rec="$records/rank-$r"
    st=$(awk '$1 == "exit" {print $3}' "$rec" 2>/dev/null | tail -1)
    if [ -z "$st" ]; then all_exited=0; continue; fi
    if [ "$st" -gt 128 ]; then
      sig=$((st - 128))
      seen[$r]="rank $r (host ${rank_host[r]}) killed by signal $sig"
    fi
  done
  while read -r r; do
    [ -z "$r" ] || [ -n "${seen[$r]:-}" ] || seen[$r]="rank $r (host ${rank_host[r]:-?}) left the job"
  done < <(grep -oE 'rank [0-9]+ has left the job' "$errlog" 2>/dev/null | awk '{print $2}' | sort -un)
  while read -r r sig; do
    [ -n "$r" ] && [ -z "${seen[$r]:-}" ] && seen[$r]="rank $r (host ${rank_host[r]:-?}) received $sig"
  done < <(grep -oE 'rank [0-9]+: received SIG[A-Z]+' "$errlog" 2>/dev/null | sed -E 's/rank ([0-9]+): received /\1 /' | sort -un)
  if [ "${#seen[@]}" -eq 0 ] && [ -n "$(torn_down)" ]; then  # a rank's status-0 exit took the others down
    for ((r = 0; r < world; r++)); do
      st=$(awk '$1 == "exit" {print $3}' "$records/rank-$r" 2>/dev/null | tail -1)
      [ "$st" != 0 ] || seen[$r]="rank $r (host ${rank_host[r]}) left the job (exit status 0 before the job ended)"
    done
  fi
  if [ "${#seen[@]}" -eq 0 ] && [ "$all_exited" = 0 ] && [ -n "$hostfile" ]; then
    local h
    for h in $(printf '%s\n' "${rank_host[@]}" | awk '!s[$0]++'); do
      if ! timeout 30 "$launcher" -hosts "$h" -n 1 true > /dev/null 2>&1; then
        failed_hosts+=("$h"); why="${why:+$why, }host $h unreachable"
      fi
    done
  fi
  for r in $(printf '%s\n' "${!seen[@]}" | sort -n); do
    why="${why:+$why, }${seen[$r]}"
    lost_slots=$((lost_slots + 1))
    [[ " ${failed_hosts[*]} " == *" ${rank_host[r]} "* ]] || failed_hosts+=("${rank_host[r]}")
  done
  [ -n "$why" ]
}

kill_leftovers() {  # every process group of the last launch recorded on this host: gone before relaunch
  local pg t me mine
  me=$(hostname) mine=$(ps -o pgid= -p $$ | tr -d ' ')
  [ -n "${records:-}" ] || return 0
  while read -r pg; do
    if ! [[ "$pg" =~ ^[0-9]+$ ]] || [ "$pg" -le 1 ] || [ "$pg" = "$mine" ]; then continue; fi
    kill -KILL -- "-$pg" 2>/dev/null || true
    for ((t = 0; t < 100; t++)); do kill -0 -- "-$pg" 2>/dev/null || break; sleep 0.1; done
  done < <(cat "$records"/rank-* 2>/dev/null | awk -v h="$me" '$1 == "start" && $4 == h {print $3}' | sort -u)
}

restarts=0 old_world="" resume_step="" records="" why=""
read_hosts
if [ "$dp0" -gt 0 ]; then  # an explicit --dp fixes the first size
  world=$((dp0 * granule)) avail=0
  for n in "${slots[@]}"; do avail=$((avail + n)); done
  if [ "$world" -lt "$min_ranks" ] || { [ -n "$max_ranks" ] && [ "$world" -gt "$max_ranks" ]; } || [ "$world" -gt "$avail" ]; then
    die "--dp $dp0 x pp x tp ($granule) needs $world ranks: outside [--min-ranks $min_ranks, --max-ranks ${max_ranks:-$avail}] or more than the $avail usable; drop --dp (the job then fits dp to the ranks) or change it"
  fi
else
  choose_world
fi
while :; do
  place "$world"
  records="$run_dir/launch-$restarts"
  errlog="$records/stderr"
  mkdir -p "$records"
  args=("${job_args[@]}")
  [ -z "$resume_step" ] || args+=(--resume)
  [ "$dp0" -eq 0 ] || args+=(--dp "$((world / granule))")
  mpi=(-n "$world")
  if [ -n "$hostfile" ]; then
    mpi=(-f "$run_dir/machinefile" "${mpi[@]}")
  elif [ "$world" -ge "$(nproc)" ]; then  # oversubscribed: MPICH must yield (as launchers/local.sh)
    export MPIR_CVAR_CH4_PROGRESS_THROTTLE=${MPIR_CVAR_CH4_PROGRESS_THROTTLE:-1}
    export MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT=${MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT:-1}
  fi
  # stderr shown live and kept to find abort lines naming a rank; stdout passes through
  (DTELASTIC_RECORDS=$records "$launcher" "${mpi[@]}" "$self" --rank-wrapper "$py" -m disttrain.train "${args[@]}" \
     2>&1 1>&3 3>&- | tee "$errlog" >&2; exit "${PIPESTATUS[0]}") 3>&1 &
  job_pid=$!
  set +e
  wait "$job_pid"
  rc=$?
  set -e
  job_pid=""
  if [ "$rc" -eq 0 ]; then
    # MPICH's Hydra tears every rank down (SIGKILL, nothing of theirs runs) when one exits with
    # status 0 after MPI_Init without MPI_Finalize (os._exit(0) mid-run), and then returns that
    # rank's 0: a rank that started and has no exit record was torn down - the job did not finish
    torn=$(torn_down); torn=${torn% }
    [ -n "$torn" ] || exit 0
    echo "elastic: mpiexec returned 0, but rank(s) $torn never exited on their own: a rank left the job with status 0 before it ended" >&2
    rc=1
  fi
  kill_leftovers
  if ! attribute; then
    die "the job ended with status $rc and no rank or host failed (a configuration error, non-finite gradients or an uncaught exception: see above); not restarting" "$rc"
  fi
  if [ "$restarts" -ge "$max_restarts" ]; then
    die "giving up: $why, and the $max_restarts restart(s) of --max-restarts are used up (job status $rc)" 75
  fi
  restarts=$((restarts + 1))
  if [ -n "$hostfile" ]; then
    for h in "${failed_hosts[@]}"; do dropped[$h]=1; done
  else
    local_slots=$((local_slots - lost_slots))
  fi
  old_world=$world
  read_hosts
  choose_world
  resume_step=$("$py" -m disttrain.elastic newest-step "$ckpt_dir") \
    || die "giving up: cannot look for checkpoints in $ckpt_dir (above) after $why" 1
  if [ "$resume_step" = none ]; then
    resume_step="" from="no valid checkpoint yet: starting fresh"
  else
    from="resuming from step $resume_step"
  fi
  echo "elastic: restart $restarts/$max_restarts: $why; world $old_world -> $world; $from" >&2
done
