"""Scaling benchmark for data-parallel training, side by side with PyTorch DDP (gloo) when installed.

    python scripts/bench_scaling.py                          # P = 1..cores, weak + strong, MLP 784-1024-1024-10
    python scripts/bench_scaling.py --max-procs 4 --plot     # oversubscribe, draw results/bench_scaling.png
    python scripts/bench_scaling.py --from-json results/bench_scaling.json --plot     # redraw
    python scripts/bench_scaling.py --algorithms auto,shm --modes weak --max-procs 2  # buckets: shared vs copied
    sudo env PATH=/usr/sbin:$PATH python scripts/bench_scaling.py --cluster 2x1 --algorithms auto,ring
                                                             # P = 2 on two emulated hosts (1 Gbit/s)

The driver (this script without --worker) launches every configuration as its own
``mpiexec -n P python scripts/bench_scaling.py --worker ...`` job, in interleaved repeats (every
P and implementation once per repeat, so drift on a shared machine hits all of them alike), and
reports the median over repeats. PyTorch runs under the same mpiexec (rank and size from the
launcher's environment) but talks through torch.distributed's gloo backend, not MPI.

Every worker: one BLAS/OpenMP thread per rank (``--threads``), float32, synthetic inputs (the
benchmark measures the runtime, not learning), momentum SGD, warm-up steps, then timed steps.
Throughput = global samples / the slowest rank's wall time.

- weak scaling: batch per rank fixed (``--batch``); efficiency(P) = thr(P) / (P * thr(1)).
- strong scaling: global batch fixed (``--global-batch``, split over ranks); same efficiency formula
  (it equals t(1) / (P t(P)) for a fixed amount of work).
- comm_ms: time the bucket allreduces ran (on the communication thread) per step;
  exposed_ms: the part of it the training loop waited for after backward (not hidden).
  PyTorch exposes neither, so only throughput is compared.
- Where the time goes (disttrain rows, the slowest rank's per-step milliseconds): fwd, bwd (the
  model's backward + the bucket hand-offs + the wait), opt; main_cpu / comm_cpu = CPU time of the
  training thread / of the communication thread per step (comm_cpu includes its spinning and
  sleeping waits for a peer; on 2 cores that is time the other rank's GEMM may need).
- --algorithms: one disttrain series per name: "auto" (label "disttrain": on one node the buckets
  live in shared memory, parallel/shared_buckets.py) and e.g. "shm" (label "disttrain[shm]": the
  buckets copied through the shm allreduce), "ring", "hier".
- --cluster HxK: P = H*K ranks on H emulated hosts (launchers/emulated_cluster.sh, root; UCX over
  the shaped links), P = 1 on the machine itself; PyTorch finds rank 0 at host "h0".
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import time

import numpy as np
from _bench import ROOT, add_output_args, emit, run_result, save, worker_env


# ----------------------------------------------------------------------------------- workers
def _synthetic(batch: int, sizes, seed: int):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, sizes[0])).astype(np.float32), rng.integers(0, sizes[-1], batch)


def worker_disttrain(a) -> dict | None:
    sys.path.insert(0, ROOT)
    from disttrain_zoo.mlp import MLP
    from mpi4py import MPI

    import disttrain as dt
    from disttrain import nn, optim
    from disttrain.comm.engine import engine

    dt.init()
    r = dt.rank()
    x, y = _synthetic(a.local_batch, a.sizes, 1 + r)
    model, loss_fn = MLP(a.sizes), nn.SoftmaxCrossEntropy()
    ddp = dt.DataParallel(model, bucket_mb=a.bucket_mb, algorithm=a.algorithm, overlap=not a.no_overlap)
    opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    phase = np.zeros(3)  # forward, backward (with hand-offs and the wait), optimizer

    def step():
        t0 = time.perf_counter()
        loss_fn.forward(ddp.forward(x), y)
        t1 = time.perf_counter()
        ddp.backward(loss_fn.backward())
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad()
        phase[:] += (t1 - t0, t2 - t1, time.perf_counter() - t2)

    for _ in range(a.warmup):
        step()
    ddp.comm_seconds = ddp.exposed_comm_seconds = 0.0
    phase[:] = 0
    world = dt.world().comm
    world.Barrier()
    comm0, main0 = comm_thread_cpu(engine), time.thread_time()
    t = time.perf_counter()
    for _ in range(a.steps):
        step()
    elapsed = time.perf_counter() - t
    stats = np.array([elapsed, ddp.comm_seconds, ddp.exposed_comm_seconds, *phase, time.thread_time() - main0,
                      comm_thread_cpu(engine) - comm0])
    worst = np.empty_like(stats)
    world.Allreduce(stats, worst, op=MPI.MAX)
    if r:
        return None
    ms = worst / a.steps * 1e3
    return dict(elapsed_s=worst[0], comm_ms=ms[1], exposed_ms=ms[2], fwd_ms=ms[3], bwd_ms=ms[4], opt_ms=ms[5],
                main_cpu_ms=ms[6], comm_cpu_ms=ms[7], shared_buckets=ddp._shared is not None,
                buckets=len(ddp.buckets))


def comm_thread_cpu(engine) -> float:
    """CPU seconds the communication thread of `engine` has used (0 before it started)."""
    t = engine._thread
    return time.clock_gettime(time.pthread_getcpuclockid(t.ident)) if t is not None and t.is_alive() else 0.0


def worker_torch(a) -> dict | None:
    import torch
    import torch.distributed as tdist

    torch.set_num_threads(a.threads)
    env = os.environ
    r = int(env.get("PMI_RANK", env.get("OMPI_COMM_WORLD_RANK", 0)))
    p = int(env.get("PMI_SIZE", env.get("OMPI_COMM_WORLD_SIZE", 1)))
    tdist.init_process_group("gloo", init_method=f"tcp://{a.master}:{a.port}", rank=r, world_size=p)
    torch.manual_seed(0)
    layers = []
    for i, (m, n) in enumerate(zip(a.sizes[:-1], a.sizes[1:])):
        layers.append(torch.nn.Linear(m, n))
        if i < len(a.sizes) - 2:
            layers.append(torch.nn.ReLU())
    net = torch.nn.Sequential(*layers)
    model = torch.nn.parallel.DistributedDataParallel(net, bucket_cap_mb=a.bucket_mb) if p > 1 else net
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    xn, yn = _synthetic(a.local_batch, a.sizes, 1 + r)
    x, y = torch.from_numpy(xn), torch.from_numpy(yn)

    def step():
        opt.zero_grad()  # as DDP's users write it (set_to_none=True since PyTorch 2.0)
        loss_fn(model(x), y).backward()
        opt.step()

    for _ in range(a.warmup):
        step()
    tdist.barrier()
    t = time.perf_counter()
    for _ in range(a.steps):
        step()
    elapsed = torch.tensor([time.perf_counter() - t], dtype=torch.float64)
    tdist.all_reduce(elapsed, op=tdist.ReduceOp.MAX)
    tdist.destroy_process_group()
    return None if r else dict(elapsed_s=float(elapsed[0]), comm_ms=None, exposed_ms=None)


# ------------------------------------------------------------------------------------ driver
def have_torch() -> bool:
    try:
        import importlib.util
        return importlib.util.find_spec("torch") is not None
    except ValueError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(impl: str, p: int, local_batch: int, a, algorithm: str = "auto") -> dict:
    work = [os.path.abspath(__file__), "--worker", impl, "--local-batch", str(local_batch),
            "--sizes", ",".join(map(str, a.sizes)), "--steps", str(a.steps), "--warmup", str(a.warmup),
            "--bucket-mb", str(a.bucket_mb), "--algorithm", algorithm, "--threads", str(a.threads),
            "--port", str(free_port())] + (["--no-overlap"] if a.no_overlap else [])
    env = worker_env(a.threads, throttle=p > (os.cpu_count() or 1))
    if a.cluster and p > 1:  # emulated hosts: the launcher runs mpiexec inside host 0's namespace
        hosts, per = a.cluster
        cmd = [os.path.join(ROOT, "launchers", "emulated_cluster.sh"), "--hosts", str(hosts),
               "--ranks-per-host", str(per), "--rate", a.rate, "--"] + work + ["--master", "h0"]
        env.update(PYTHON=sys.executable, PATH="/usr/sbin:/sbin:" + env.get("PATH", ""))
        return run_result(cmd, env, a.timeout)
    mpiexec = shutil.which("mpiexec") or os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return run_result([mpiexec, "-n", str(p), sys.executable] + work, env, a.timeout)


def run_all(a) -> list[dict]:
    impls = [("disttrain" if alg == "auto" else f"disttrain[{alg}]", alg) for alg in a.algorithms]
    impls += [("torch-ddp", "")] if a.torch == "on" or (a.torch == "auto" and have_torch()) else []
    procs = [1, a.cluster[0] * a.cluster[1]] if a.cluster else list(range(1, a.max_procs + 1))
    configs = [(mode, p, impl) for mode in a.modes for p in procs for impl in impls]
    samples: dict = {c: [] for c in configs}
    for rep in range(a.repeats):
        for mode, p, impl in configs:
            if mode == "strong" and a.global_batch % p:
                continue
            local = a.batch if mode == "weak" else a.global_batch // p
            name, alg = impl
            res = launch("torch" if name == "torch-ddp" else "disttrain", p, local, a, alg)
            res["samples_per_s"] = local * p * a.steps / res["elapsed_s"]
            samples[(mode, p, impl)].append(res)
            print(f"  repeat {rep + 1}/{a.repeats} {mode:6s} P={p} {name:10s} "
                  f"{res['samples_per_s']:>10,.0f} samples/s", flush=True)
    rows = []
    for (mode, p, (impl, _)), rs in samples.items():
        if not rs:
            continue
        med = lambda k: statistics.median(r[k] for r in rs) if rs[0].get(k) is not None else None
        local = a.batch if mode == "weak" else a.global_batch // p
        rows.append(dict(mode=mode, impl=impl, procs=p, local_batch=local, global_batch=local * p,
                         samples_per_s=med("samples_per_s"), step_ms=1e3 * med("elapsed_s") / a.steps,
                         repeats=len(rs), **{k: med(k) for k in PHASES}, shared_buckets=rs[0].get("shared_buckets"),
                         cluster="x".join(map(str, a.cluster)) if a.cluster and p > 1 else ""))
    for r in rows:
        base = next(b for b in rows if b["mode"] == r["mode"] and b["impl"] == r["impl"] and b["procs"] == 1)
        r["efficiency"] = r["samples_per_s"] / (r["procs"] * base["samples_per_s"])
        twin = [b for b in rows if b["mode"] == r["mode"] and b["procs"] == r["procs"] and b["impl"] == "torch-ddp"]
        r["vs_torch"] = (r["samples_per_s"] / twin[0]["samples_per_s"] if twin and r["impl"].startswith("disttrain")
                         else None)
        # each repeat's own ratios (its runs were minutes apart at most): how reliable the medians are
        thr = lambda impl, p: [x["samples_per_s"] for x in samples[(r["mode"], p, impl)]]
        key = next(i for i in samples_impls(samples) if i[0] == r["impl"])
        r["efficiency_each"] = [t / (r["procs"] * b) for t, b in zip(thr(key, r["procs"]), thr(key, 1))]
        r["vs_torch_each"] = ([t / d for t, d in zip(thr(key, r["procs"]), thr(("torch-ddp", ""), r["procs"]))]
                              if twin and r["impl"].startswith("disttrain") else None)
    return rows


def samples_impls(samples: dict) -> list:
    """The (label, algorithm) pairs measured."""
    return list(dict.fromkeys(impl for _, _, impl in samples))


PHASES = ("comm_ms", "exposed_ms", "fwd_ms", "bwd_ms", "opt_ms", "main_cpu_ms", "comm_cpu_ms")


def report(rows: list[dict], meta: dict) -> None:
    print(f"\nMLP {meta['sizes']}, float32, {meta['threads']} thread(s)/rank, {meta['steps']} timed steps, "
          f"median of {meta['repeats']} repeats, {meta['host']}")
    print(f"{'mode':6s} {'impl':15s} {'P':>2s} {'batch/rank':>10s} {'samples/s':>11s} {'step ms':>8s} "
          f"{'eff':>5s} {'comm ms':>8s} {'exposed ms':>10s} {'vs DDP':>7s}  {'fwd':>5s} {'bwd':>5s} {'opt':>5s} "
          f"{'main cpu':>8s} {'comm cpu':>8s}")
    for r in rows:
        f = lambda v, fmt: format(v, fmt) if v is not None else "-"
        print(f"{r['mode']:6s} {r['impl']:15s} {r['procs']:>2d} {r['local_batch']:>10d} {r['samples_per_s']:>11,.0f} "
              f"{r['step_ms']:>8.2f} {r['efficiency']:>5.2f} {f(r['comm_ms'], '8.2f'):>8s} "
              f"{f(r['exposed_ms'], '10.2f'):>10s} {f(r['vs_torch'], '7.2f'):>7s}  {f(r.get('fwd_ms'), '5.2f'):>5s} "
              f"{f(r.get('bwd_ms'), '5.2f'):>5s} {f(r.get('opt_ms'), '5.2f'):>5s} {f(r.get('main_cpu_ms'), '8.2f'):>8s} "
              f"{f(r.get('comm_cpu_ms'), '8.2f'):>8s}")
    each = [r for r in rows if r["procs"] > 1 and r.get("efficiency_each")]
    if each:
        print("each repeat (P > 1): efficiency / vs DDP")
    for r in each:
        vs = r.get("vs_torch_each") or [None] * len(r["efficiency_each"])
        print(f"  {r['mode']:6s} {r['impl']:15s} P={r['procs']}: " + ", ".join(
            f"{e:.3f}" + (f" / {v:.2f}x" if v is not None else "") for e, v in zip(r["efficiency_each"], vs)))


def plot(rows: list[dict], path: str, meta: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    modes = sorted({r["mode"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(2, len(modes), figsize=(6 * len(modes), 8), squeeze=False)
    for j, mode in enumerate(modes):
        for impl in sorted({r["impl"] for r in rows}):
            rs = sorted((r for r in rows if r["mode"] == mode and r["impl"] == impl), key=lambda r: r["procs"])
            ps = [r["procs"] for r in rs]
            axes[0][j].plot(ps, [r["samples_per_s"] for r in rs], "o-", label=impl)
            axes[1][j].plot(ps, [r["efficiency"] for r in rs], "o-", label=impl)
        batch = f"{meta['batch']}/rank" if mode == "weak" else f"global {meta['global_batch']}"
        axes[0][j].set(title=f"{mode} scaling, MLP {meta['sizes']}, batch {batch}, {meta['threads']} thread(s)/rank",
                       xlabel="ranks", ylabel="samples/s", xticks=ps)
        top = max([1.1] + [r["efficiency"] * 1.05 for r in rows if r["mode"] == mode])  # superlinear points stay
        axes[1][j].set(xlabel="ranks", ylabel="scaling efficiency", ylim=(0, top), xticks=ps)
        axes[1][j].axhline(0.85, ls=":", c="grey", label="0.85 (target)")
        axes[1][j].axhline(1.0, ls="-", c="lightgrey", lw=0.8, label="linear")
        for ax in axes[:, j]:
            ax.legend()
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", choices=["disttrain", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--local-batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="784,1024,1024,10")
    ap.add_argument("--batch", type=int, default=128, help="weak scaling: samples per rank per step")
    ap.add_argument("--global-batch", type=int, default=256, help="strong scaling: samples per step, all ranks")
    ap.add_argument("--max-procs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--modes", default="weak,strong")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads per rank")
    ap.add_argument("--bucket-mb", type=float, default=25.0)
    ap.add_argument("--algorithms", "--algorithm", dest="algorithm", default="auto",
                    help="DataParallel algorithm(s), comma-separated: one disttrain series each")
    ap.add_argument("--cluster", help="HxK: P = H*K on H emulated hosts (root; launchers/emulated_cluster.sh)")
    ap.add_argument("--rate", default="1gbit", help="--cluster link rate per direction (tc syntax)")
    ap.add_argument("--master", default="127.0.0.1", help=argparse.SUPPRESS)
    ap.add_argument("--no-overlap", action="store_true")
    ap.add_argument("--torch", choices=["auto", "on", "off"], default="auto",
                    help="compare with PyTorch DDP (gloo): auto = when torch is installed")
    add_output_args(ap, "bench_scaling")
    a = ap.parse_args(argv)
    a.sizes = [int(s) for s in a.sizes.split(",")]
    a.modes = a.modes.split(",")
    a.algorithms = a.algorithm.split(",")
    a.cluster = tuple(int(v) for v in a.cluster.lower().split("x")) if a.cluster else None
    if a.worker == "torch":
        emit(worker_torch(a))
        sys.stdout.flush()
        os._exit(0)  # torch 2.14's gloo teardown at interpreter exit aborted once (exit 6) after the result
    if a.worker:
        emit(worker_disttrain(a))
        return 0
    if a.from_json:
        with open(a.from_json) as f:
            doc = json.load(f)
        report(doc["rows"], doc["meta"])
        if a.plot:
            plot(doc["rows"], os.path.splitext(a.from_json)[0] + ".png", doc["meta"])
        return 0
    meta = dict(sizes=a.sizes, threads=a.threads, steps=a.steps, repeats=a.repeats, batch=a.batch,
                global_batch=a.global_batch, bucket_mb=a.bucket_mb, algorithm=a.algorithm, cluster=a.cluster,
                rate=a.rate if a.cluster else None, loadavg=open("/proc/loadavg").read().split()[:3],
                overlap=not a.no_overlap, host=f"{os.cpu_count()} cores", python=sys.version.split()[0])
    rows = run_all(a)
    report(rows, meta)
    save(a.out, meta, rows)
    if a.plot:
        plot(rows, a.out + ".png", meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
