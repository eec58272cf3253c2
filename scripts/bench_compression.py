"""Gradient compression benchmark: bytes, step time on shared memory and over an emulated network
link, and what compression costs in accuracy.

    python scripts/bench_compression.py --plot                # everything (the link part needs root)
    python scripts/bench_compression.py --networks shm        # shared memory only
    python scripts/bench_compression.py --from-json results/bench_compression.json --plot

Two parts, every configuration its own 2-rank job (P = --procs):

1. step time: MLP 784-1024-1024-10 (1.86 M parameters, float32), synthetic batch of --batch per rank,
   DataParallel(compression=c), median of --steps timed steps after warm-up, per network:
   ``shm`` = one host, ranks talk through shared memory (mpiexec -n P);
   ``link`` = P emulated hosts joined by --rate links (launchers/emulated_cluster.sh: network
   namespaces, veth, tc token bucket; UCX over TCP), one rank per host.
   Reported: payload bytes per rank per step, compression ratio (raw gradient bytes / payload),
   bytes each rank sends per step (bandwidth-optimal formula, see compression/base.py), step time,
   and speed-up against "none" measured in the same run on the same network.
2. accuracy: the main job (python -m disttrain.train: MLP 64-256-256-10 on the embedded digits
   data, 600 steps, global batch 64) per compressor and --seeds, test accuracy every 25 steps:
   final test accuracy (mean over seeds) and its difference from "none", and the training time
   (evaluation excluded) until the test accuracy first reaches --target, per network.

Compressors, bytes and ratios are exact; times are medians on this machine, which is noisy.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from _bench import ROOT, add_output_args, emit, run_result, save, timed_steps, worker_env

DEFAULT = "none,fp16,bf16,topk:0.01,onebit,powersgd:2"
LAUNCH = os.path.join(ROOT, "launchers", "emulated_cluster.sh")


# ----------------------------------------------------------------------------------- worker
def worker_step(a) -> dict | None:
    sys.path.insert(0, ROOT)
    from disttrain_zoo.mlp import MLP
    from mpi4py import MPI

    import disttrain as dt
    from disttrain import nn, optim

    dt.init()
    r = dt.rank()
    rng = np.random.default_rng(1 + r)
    x = rng.standard_normal((a.batch, a.sizes[0])).astype(np.float32)
    y = rng.integers(0, a.sizes[-1], a.batch)
    model, loss_fn = MLP(a.sizes), nn.SoftmaxCrossEntropy()
    ddp = dt.DataParallel(model, compression=a.compression, bucket_mb=a.bucket_mb)
    opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    world = dt.world().comm
    times = timed_steps(world, ddp, opt, loss_fn, x, y, a.warmup + a.steps)
    slowest = np.empty(a.steps)
    world.Allreduce(np.array(times[a.warmup:]), slowest, op=MPI.MAX)
    w = ddp.wire_stats
    calls = max(1, w["calls"])
    steps = a.warmup + a.steps
    hosts = len(set(world.allgather(MPI.Get_processor_name())))  # collective: every rank calls it
    return None if r else dict(
        step_ms=1e3 * float(np.median(slowest)), payload_bytes=w["payload_bytes"] / steps,
        raw_bytes=w["raw_bytes"] / steps, sent_bytes=w["sent_bytes"] / steps, ratio=w["ratio"],
        buckets=calls / steps, hosts=hosts)


# ----------------------------------------------------------------------------------- driver
def launcher(network: str, a) -> list:
    if network == "shm":
        mpiexec = shutil.which("mpiexec") or os.path.join(os.path.dirname(sys.executable), "mpiexec")
        return [mpiexec, "-n", str(a.procs), sys.executable]
    return ["env", f"PYTHON={sys.executable}", LAUNCH, "--hosts", str(a.procs), "--rate", a.rate, "--"]


def step_rows(a) -> list[dict]:
    samples = {(n, c): [] for n in a.networks for c in a.compressors}
    for rep in range(a.repeats):  # interleaved: drift hits every configuration alike
        for net in a.networks:
            for c in a.compressors:
                cmd = launcher(net, a) + [os.path.abspath(__file__), "--worker", "--compression", c,
                                          "--sizes", ",".join(map(str, a.sizes)), "--batch", str(a.batch),
                                          "--steps", str(a.steps), "--warmup", str(a.warmup),
                                          "--bucket-mb", str(a.bucket_mb)]
                res = run_result(cmd, worker_env(a.threads, throttle=False), a.timeout)
                samples[(net, c)].append(res)
                print(f"  repeat {rep + 1}/{a.repeats} {net:4s} {c:11s} {res['step_ms']:8.2f} ms/step "
                      f"({res['hosts']} host(s))", flush=True)
    rows = []
    for (net, c), rs in samples.items():
        row = dict(rs[0], network=net, compression=c, step_ms=statistics.median(r["step_ms"] for r in rs),
                   repeats=len(rs))
        rows.append(row)
    for row in rows:
        base = next(b for b in rows if b["network"] == row["network"] and b["compression"] == "none")
        row["speedup"] = base["step_ms"] / row["step_ms"]
    return rows


def accuracy_rows(a) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for net in a.networks:
            for c in a.compressors:
                for seed in a.seeds:
                    path = os.path.join(tmp, f"{net}-{c.replace(':', '_')}-{seed}.jsonl")
                    cmd = launcher(net, a) + ["-m", "disttrain.train", "--compression", c, "--seed", str(seed),
                                              "--eval-every", str(a.eval_every), "--metrics", path]
                    t = time.perf_counter()
                    out = subprocess.run(cmd, env=worker_env(a.threads, throttle=False), capture_output=True,
                                         text=True, timeout=a.timeout)
                    if out.returncode:
                        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
                    recs = [json.loads(ln) for ln in open(path) if ln.strip()]
                    final = next(r for r in recs if r.get("final"))
                    evals = [r for r in recs if "test_accuracy" in r and "train_time_s" in r]
                    hit = next((r for r in evals if r["test_accuracy"] >= a.target), None)
                    train = [r for r in recs if "loss" in r]
                    rows.append(dict(network=net, compression=c, seed=seed, test_accuracy=final["test_accuracy"],
                                     time_to_target_s=hit["train_time_s"] if hit else None,
                                     steps_to_target=hit["step"] if hit else None,
                                     train_time_s=train[-1]["train_time_s"], ratio=train[-1]["compression_ratio"],
                                     sent_bytes=train[-1]["sent_bytes"]))
                    print(f"  {net:4s} {c:11s} seed {seed}: accuracy {final['test_accuracy']:.4f}, "
                          f"{a.target:.0%} after {rows[-1]['steps_to_target']} steps / "
                          f"{rows[-1]['time_to_target_s'] or float('nan'):.2f} s "
                          f"({time.perf_counter() - t:.0f} s wall)", flush=True)
    return rows


def summarize_accuracy(rows: list[dict], target: float) -> list[dict]:
    out = []
    for net in dict.fromkeys(r["network"] for r in rows):
        for c in dict.fromkeys(r["compression"] for r in rows):
            rs = [r for r in rows if r["network"] == net and r["compression"] == c]
            hits = [r["time_to_target_s"] for r in rs if r["time_to_target_s"] is not None]
            out.append(dict(network=net, compression=c, seeds=len(rs), ratio=rs[0]["ratio"],
                            accuracy=statistics.mean(r["test_accuracy"] for r in rs),
                            time_to_target_s=statistics.median(hits) if len(hits) == len(rs) else None,
                            steps_to_target=statistics.median(r["steps_to_target"] for r in rs)
                            if len(hits) == len(rs) else None,
                            train_time_s=statistics.median(r["train_time_s"] for r in rs), target=target))
    for s in out:
        base = next(b for b in out if b["network"] == s["network"] and b["compression"] == "none")
        s["accuracy_delta_pp"] = 100 * (s["accuracy"] - base["accuracy"])
    return out


def report(meta: dict, steps: list[dict], acc: list[dict]) -> None:
    if steps:
        print(f"\nStep time: MLP {meta['sizes']}, float32, batch {meta['batch']}/rank, P={meta['procs']}, "
              f"median of {meta['steps']} steps x {meta['repeats']} repeats; link = {meta['rate']} emulated hosts")
        print("| compression | payload KiB/rank/step | ratio | sent MiB/rank/step | network | step ms "
              "| speed-up vs none |")
        print("|---|---:|---:|---:|---|---:|---:|")
        for r in steps:
            print(f"| {r['compression']} | {r['payload_bytes'] / 1024:,.1f} | {r['ratio']:.1f}x | "
                  f"{r['sent_bytes'] / 2 ** 20:.3f} | {r['network']} | {r['step_ms']:.2f} | {r['speedup']:.2f}x |")
    if acc:
        print(f"\nAccuracy: main job (MLP 64-256-256-10, digits, 600 steps), P={meta['procs']}, "
              f"seeds {meta['seeds']}, target {meta['target']:.0%}")
        print("| compression | network | ratio | test accuracy | vs none (pp) | time to target s | steps to target |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for r in acc:
            f = lambda v, fmt: format(v, fmt) if v is not None else "not reached"
            print(f"| {r['compression']} | {r['network']} | {r['ratio']:.1f}x | {r['accuracy']:.4f} | "
                  f"{r['accuracy_delta_pp']:+.2f} | {f(r['time_to_target_s'], '.2f')} | "
                  f"{f(r['steps_to_target'], '.0f')} |")


def plot(steps: list[dict], acc: list[dict], path: str, meta: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    comps = list(dict.fromkeys(r["compression"] for r in steps or acc))
    nets = list(dict.fromkeys(r["network"] for r in steps or acc))
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    xs = np.arange(len(comps))
    w = 0.8 / max(1, len(nets))
    for i, net in enumerate(nets):
        st = {r["compression"]: r for r in steps if r["network"] == net}
        ac = {r["compression"]: r for r in acc if r["network"] == net}
        if st:
            axes[1].bar(xs + i * w, [st[c]["step_ms"] for c in comps], w, label=net)
        if ac:
            axes[2].bar(xs + i * w, [ac[c]["time_to_target_s"] or 0 for c in comps], w, label=net)
    st0 = {r["compression"]: r for r in steps if r["network"] == nets[0]}
    if st0:
        axes[0].bar(xs, [st0[c]["ratio"] for c in comps])
        axes[0].set_yscale("log")
    axes[0].set(title="compression ratio (raw / payload bytes)", xticks=xs, xticklabels=comps)
    mlp = "-".join(str(s) for s in meta["sizes"])
    axes[1].set(title=f"step time (ms), MLP {mlp}, batch {meta['batch']}/rank, P={meta['procs']}", xticks=xs + w * (len(nets) - 1) / 2, xticklabels=comps)
    axes[2].set(title=f"time to {meta['target']:.0%} test accuracy, digits (s; 0 = not reached)", xticks=xs + w * (len(nets) - 1) / 2, xticklabels=comps)
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
        ax.grid(alpha=0.3, axis="y")
    axes[1].legend()
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--compression", default="none", help=argparse.SUPPRESS)
    ap.add_argument("--compressors", default=DEFAULT, help=f"comma-separated specs (default {DEFAULT})")
    ap.add_argument("--networks", default="shm,link", help="shm (one host) and/or link (emulated hosts; root)")
    ap.add_argument("--parts", default="step,accuracy")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--rate", default="1gbit", help="emulated link rate, tc syntax")
    ap.add_argument("--sizes", default="784,1024,1024,10")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bucket-mb", type=float, default=25.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--target", type=float, default=0.95)
    add_output_args(ap, "bench_compression")
    a = ap.parse_args(argv)
    a.sizes = [int(s) for s in a.sizes.split(",")]
    if a.worker:
        emit(worker_step(a))
        return 0
    if a.from_json:
        with open(a.from_json) as f:
            doc = json.load(f)
        report(doc["meta"], doc["rows"], doc.get("accuracy", []))
        if a.plot:
            plot(doc["rows"], doc.get("accuracy", []), os.path.splitext(a.from_json)[0] + ".png", doc["meta"])
        return 0
    a.compressors = a.compressors.split(",")
    if "none" not in a.compressors:
        a.compressors.insert(0, "none")  # every ratio and speed-up is against it
    a.networks = a.networks.split(",")
    a.seeds = [int(s) for s in a.seeds.split(",")]
    if "link" in a.networks and os.geteuid() != 0:
        print("network 'link' needs root (network namespaces); measuring shared memory only", file=sys.stderr)
        a.networks = [n for n in a.networks if n != "link"]
    parts = a.parts.split(",")
    meta = dict(sizes=a.sizes, batch=a.batch, procs=a.procs, rate=a.rate, steps=a.steps, repeats=a.repeats,
                seeds=a.seeds, target=a.target, threads=a.threads, host=f"{os.cpu_count()} cores",
                python=sys.version.split()[0])
    steps = step_rows(a) if "step" in parts else []
    save(a.out, meta, steps)  # keep the first part even if the second fails
    acc_raw = accuracy_rows(a) if "accuracy" in parts else []
    acc = summarize_accuracy(acc_raw, a.target) if acc_raw else []
    report(meta, steps, acc)
    save(a.out, meta, steps, {"accuracy": acc, "accuracy_runs": acc_raw})
    if a.plot:
        plot(steps, acc, a.out + ".png", meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
