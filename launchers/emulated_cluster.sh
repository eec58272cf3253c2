#!/usr/bin/env bash
# Try multi-node behaviour on one machine: N emulated hosts joined by shaped network links.
#
#   sudo launchers/emulated_cluster.sh [options] -- PROGRAM.py [ARGS...]
#   sudo launchers/emulated_cluster.sh --hosts 2 --rate 1gbit --delay 100us -- -m disttrain.train
#   sudo launchers/emulated_cluster.sh --cleanup         # remove leftovers of a killed run
#
# Options:
#   --hosts N            emulated hosts (default 2)
#   --ranks-per-host K   MPI ranks on each host (default 1); ranks on one host use shared memory
#   --rate R             link bandwidth per direction, tc syntax: 1gbit, 100mbit, 10gbit (default 1gbit)
#   --delay D            one-way added latency per link, tc syntax: 0, 50us, 1ms (default 0)
#   --keep-env           pass the caller's UCX_TLS through instead of forcing tcp,self
#   --cleanup            delete every namespace, /etc/netns entry and veth left by dead runs, then exit
# Environment: PYTHON (default: python on PATH), MPIEXEC (default: mpiexec on PATH; MPICH's Hydra).
#
# How (DESIGN.md sec. 5): each host is a network namespace ("ip netns") whose one interface is a
# veth pair plugged into a bridge in a private "switch" namespace - a star like a top-of-rack
# switch. Both directions of every host port are shaped with tc (token bucket at --rate, plus
# netem delay when --delay is given), so a host's uplink and downlink are each a --rate link.
# Every process of host i runs inside its namespace with its own UTS namespace and hostname
# ("h<i>"), so the MPI library sees N different nodes: Hydra's mpiexec starts in host 0 and
# reaches the other hosts through `-launcher ssh -launcher-exec` with this script standing
# in for ssh; UCX_TLS=tcp,self makes ranks on different hosts talk over TCP on the
# shaped links instead of shared memory. All addresses (10.213.0.0/24) live only inside the
# namespaces created here; nothing is configured in the caller's namespace - each veth pair is
# created directly in its two namespaces by one netlink request, so it never exists in the
# caller's, not even for an instant a kill could catch. No temporary files: the hosts table goes
# straight into /etc/netns/<ns>/hosts. Everything is torn down on exit, on error and on
# SIGINT/SIGTERM; a run killed with SIGKILL leaves its namespaces and /etc/netns entries, which
# `--cleanup` removes (it finds every name carrying a dead run's id: namespaces "dtemu<id>-*",
# /etc/netns/dtemu<id>-*, and veths "dte<id>-<i>"/"dtp<id>-<i>" should one ever be in the root
# namespace, as older versions of this script could leave them). Needs root (CAP_NET_ADMIN,
# CAP_SYS_ADMIN), iproute2 and util-linux.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
self="$here/$(basename "${BASH_SOURCE[0]}")"
prefix=dtemu

die() { echo "emulated_cluster: $*" >&2; exit 2; }

# ------------------------------------------------------------------ "ssh" for Hydra (internal)
# Hydra calls: <launcher-exec> [ssh options] HOST COMMAND...; run COMMAND inside HOST's namespace.
# DTEMU_RUN (set for mpiexec below, inherited by its children) says which run we belong to.
if [ -n "${DTEMU_RUN:-}" ]; then
  while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done  # ssh options such as -x
  host=${1:?}; shift
  ns=$prefix$DTEMU_RUN-$host
  ip netns list | grep -q "^$ns\b" || die "unknown emulated host $host (no namespace $ns)"
  exec ip netns exec "$ns" unshare --uts sh -c 'hostname "$0"; exec sh -c "$1"' "$host" "$*"
fi

# --------------------------------------------------------------------------------- cleanup
root_veths() {  # names of this script's veths in the root namespace (none, normally)
  ip -o link show 2>/dev/null | awk -F': ' '{sub(/@.*/, "", $2); print $2}' | grep -E '^dt[ep][0-9]+-[0-9]+$' || true
}

cleanup_run() {  # $1 = run id (digits): kill its processes, delete its namespaces, veths and files
  local id=$1 ns dev
  [[ "$id" =~ ^[0-9]+$ ]] || return 0
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$prefix$id-" || true); do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
  done
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$prefix$id-" || true); do
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "/etc/netns/$prefix$id-"*  # also entries whose namespace is already gone
  for dev in $(root_veths | grep -E "^dt[ep]$id-" || true); do
    ip link del "$dev" 2>/dev/null || true  # deleting one end deletes the pair
  done
}

if [ "${1:-}" = "--cleanup" ]; then
  ids=$( { ip netns list 2>/dev/null | awk '{print $1}' | sed -n "s/^$prefix\([0-9]*\)-.*/\1/p"
           ls /etc/netns 2>/dev/null | sed -n "s/^$prefix\([0-9]*\)-.*/\1/p"
           root_veths | sed -n 's/^dt[ep]\([0-9]*\)-.*/\1/p'; } | sort -u)
  for id in $ids; do
    if ! kill -0 "$id" 2>/dev/null; then echo "removing leftovers of run $id"; cleanup_run "$id"; fi
  done
  exit 0
fi

# ---------------------------------------------------------------------------------- options
hosts=2 rph=1 rate=1gbit delay=0 keep_env=0
while [ $# -gt 0 ]; do
  case "$1" in
    --hosts) hosts=${2:?}; shift 2 ;;
    --ranks-per-host) rph=${2:?}; shift 2 ;;
    --rate) rate=${2:?}; shift 2 ;;
    --delay) delay=${2:?}; shift 2 ;;
    --keep-env) keep_env=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,/^set -euo/{/^#/p}' "$self"; exit 0 ;;
    *) die "unknown option $1 (see --help); put the program after --" ;;
  esac
done
[ $# -gt 0 ] || die "no program given; usage: $0 [options] -- PROGRAM.py [ARGS...]"
[[ "$hosts" =~ ^[0-9]+$ ]] && [ "$hosts" -ge 1 ] && [ "$hosts" -le 200 ] || die "--hosts must be 1..200, got $hosts"
[[ "$rph" =~ ^[0-9]+$ ]] && [ "$rph" -ge 1 ] || die "--ranks-per-host must be >= 1, got $rph"
[ "$(id -u)" = 0 ] || die "needs root (network namespaces and tc); run it with sudo"
for t in ip tc unshare; do command -v $t >/dev/null || die "needs '$t' (iproute2 / util-linux)"; done
launcher=${MPIEXEC:-mpiexec}
# (not `... | grep -q`: with pipefail, grep's early exit can SIGPIPE mpiexec and fail the check)
version=$("$launcher" --version 2>/dev/null || true)
case "$version" in *HYDRA*) ;; *) die "needs MPICH's Hydra mpiexec (found: $(command -v "$launcher"))" ;; esac

id=$$
trap 'rc=$?; cleanup_run $id; exit $rc' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

# --------------------------------------------------------------------------------- topology
sw=$prefix$id-sw
ip netns add "$sw"
ip -n "$sw" link set lo up
ip -n "$sw" link add br0 type bridge
ip -n "$sw" link set br0 up
hosts_table=$(printf '127.0.0.1 localhost\n'; for i in $(seq 0 $((hosts - 1))); do echo "10.213.0.$((i + 1)) h$i"; done)

shape() {  # $1 = netns, $2 = device: shape its egress to --rate (+ --delay)
  local parent=root
  if [ "$delay" != 0 ]; then
    ip netns exec "$1" tc qdisc add dev "$2" root handle 1: netem delay "$delay" limit 100000 2>/dev/null \
      || die "--delay needs the kernel's netem qdisc (sch_netem), which this kernel does not offer; use --delay 0"
    parent="parent 1:"
  fi
  # burst: ~1 ms of traffic at the rate (>= 64 KiB so a GSO super-packet fits); queue: 50 ms.
  ip netns exec "$1" tc qdisc add dev "$2" $parent handle 2: tbf rate "$rate" burst 256kb latency 50ms
}

for i in $(seq 0 $((hosts - 1))); do
  ns=$prefix$id-h$i
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  # Created inside the host's namespace with its peer placed in the switch's by the same request:
  # the pair never appears in the root namespace, so a SIGKILL cannot strand it there.
  ip -n "$ns" link add "dte$id-$i" type veth peer name "dtp$id-$i" netns "$sw"
  ip -n "$ns" link set "dte$id-$i" name eth0
  ip -n "$ns" addr add "10.213.0.$((i + 1))/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$sw" link set "dtp$id-$i" master br0 up
  shape "$ns" eth0            # uplink: host -> switch
  shape "$sw" "dtp$id-$i"     # downlink: switch -> host
  mkdir -p "/etc/netns/$ns"
  printf '%s\n' "$hosts_table" > "/etc/netns/$ns/hosts"
done
hostlist=$(seq -s, -f 'h%g' 0 $((hosts - 1)))
echo "emulated_cluster: $hosts hosts x $rph ranks, links $rate each way, delay $delay (run $id)" >&2

# ---------------------------------------------------------------------------------- the job
if [ "$keep_env" = 0 ]; then export UCX_TLS=tcp,self; fi
export UCX_NET_DEVICES=${UCX_NET_DEVICES:-eth0}
export MPIR_CVAR_CH4_NETMOD=${MPIR_CVAR_CH4_NETMOD:-ucx}
n=$((hosts * rph))
# OMP threads: the ranks of all hosts share this machine's cores
share=$(( $(nproc) / n )); [ "$share" -ge 1 ] || share=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$share}
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-$OMP_NUM_THREADS}
export MKL_NUM_THREADS=${MKL_NUM_THREADS:-$OMP_NUM_THREADS}
if [ "$n" -ge "$(nproc)" ]; then
  export MPIR_CVAR_CH4_PROGRESS_THROTTLE=${MPIR_CVAR_CH4_PROGRESS_THROTTLE:-1}
  export MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT=${MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT:-1}
fi
# In the background + wait: bash runs a trap only after a foreground command ends, but it
# interrupts `wait` - so SIGTERM tears the job down now, not when the job finishes by itself.
DTEMU_RUN=$id ip netns exec "$prefix$id-h0" unshare --uts sh -c 'hostname h0; exec "$@"' sh \
  "$(command -v "$launcher")" -hosts "$hostlist" -ppn "$rph" -n "$n" \
  -launcher ssh -launcher-exec "$self" -iface eth0 \
  "${PYTHON:-python}" "$@" &
set +e
wait $!
rc=$?
set -e
exit $rc
