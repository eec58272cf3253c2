"""Length bucketing benchmark: naive vs bucketed vs load-balanced batching of variable-length text.

    python scripts/bench_bucketing.py --plot                    # P = 2 and 4, all three strategies
    python scripts/bench_bucketing.py --procs 2 --epochs 1      # quicker
    python scripts/bench_bucketing.py --from-json results/bench_bucketing.json --plot

Every (P, strategy) is one run of the main job - ``mpiexec -n P python -m disttrain.train --model
gnmt --batching S`` - on the standard-library documentation corpus (reverse translation, ~8,600
training sentences of 4-41 tokens, vocabulary 200), a fixed global batch of --global-batch sentences
split over the P ranks, the same number of epochs, optimizer steps and learning-rate schedule for
every strategy and every P. Only how sentences
are grouped into batches and spread over ranks differs, so the comparison is:

- padding: padded token slots that hold no token (exact, from the batching plan, data/bucketing.py);
- imbalance: max / mean real tokens per rank per step (exact, from the plan; mean over steps);
- sync wait: seconds per step a rank waits at the gradient synchronisation (measured by the main
  job, mean over ranks and steps), and the part of it explained by the other ranks computing
  longer (imbalance wait);
- tokens/s: real target tokens trained per second of training time;
- time to target loss: training time until the logged (token-weighted, all ranks) training loss
  first reaches --target-loss.

Ratios against ``naive`` are measured in the same invocation. P > 2 oversubscribes this 2-core
machine (MPICH's yielding progress is switched on, DESIGN.md sec. 5): times then include ranks
sharing cores, which also makes an imbalanced step slower for everybody.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np
from _bench import ROOT, add_output_args, save, worker_env

STRATEGIES = ["naive", "bucketed", "load_balanced"]


def plan_stats(P: int, strategy: str, global_batch: int, epochs: int, seed: int) -> dict:
    sys.path.insert(0, ROOT)
    from disttrain.data import Batcher, text

    train, _ = text.split(text.load_reverse_corpus(), test_fraction=0.05, seed=0)  # as workloads.py
    b = Batcher(train.lengths, strategy, P, global_batch=global_batch, seed=seed)
    plans = [b.plan(e).summary() for e in range(epochs)]
    real, padded = sum(p["real_tokens"] for p in plans), sum(p["padded_tokens"] for p in plans)
    return dict(steps=sum(p["steps"] for p in plans), padding=1 - real / padded,
                imbalance=float(np.mean([p["imbalance_mean"] for p in plans])),
                imbalance_max=max(p["imbalance_max"] for p in plans))


def run(P: int, strategy: str, a) -> dict:
    import subprocess

    st = plan_stats(P, strategy, a.global_batch, a.epochs, a.seed)
    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "m.jsonl")
        cmd = [a.mpiexec, "-n", str(P), sys.executable, "-m", "disttrain.train", "--model", "gnmt",
               "--batching", strategy, "--max-tokens", "0", "--global-batch-size", str(a.global_batch),
               "--steps", str(st["steps"]), "--log-every", str(a.log_every), "--seed", str(a.seed),
               "--warmup-steps", str(a.warmup_steps), "--metrics", metrics]
        out = subprocess.run(cmd, env=worker_env(1, P > 2), cwd=ROOT, capture_output=True, text=True,
                             timeout=a.timeout)
        if out.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        recs = [json.loads(ln) for ln in open(metrics)]
    logged = [r for r in recs if "loss" in r]
    final = next(r for r in recs if r.get("final"))
    steps = np.diff([0] + [r["step"] for r in logged])
    secs = np.array([r["step_time_s"] for r in logged]) * steps
    tokens = float(sum(r["tokens_per_s"] * s for r, s in zip(logged, secs)))
    hit = next((r for r in logged if r["loss"] <= a.target_loss), None)
    return dict(P=P, strategy=strategy, **st,
                sync_wait_ms=1e3 * float(np.average([np.mean(r["sync_wait_s"]) for r in logged], weights=steps)),
                imbalance_wait_ms=1e3 * float(np.average([np.mean(r["imbalance_wait_s"]) for r in logged],
                                                         weights=steps)),
                step_ms=1e3 * float(secs.sum() / steps.sum()), tokens_per_s=tokens / float(secs.sum()),
                train_time_s=logged[-1]["train_time_s"],
                time_to_target_s=hit["train_time_s"] if hit else None, final_loss=logged[-1]["loss"],
                test_loss=final["test_loss"], test_token_accuracy=final["test_token_accuracy"],
                curve=[(r["train_time_s"], r["loss"]) for r in logged])


def report(rows: list, target: float) -> None:
    base = {r["P"]: r for r in rows if r["strategy"] == "naive"}
    print(f"\n{'P':>2} {'strategy':<14} {'steps':>5} {'padding':>8} {'imbal.':>7} {'imb.max':>7} {'sync wait':>10} "
          f"{'imb. wait':>10} {'step':>8} {'tokens/s':>9} {'vs naive':>8} {'to loss ' + str(target):>12} "
          f"{'vs naive':>8} {'test loss':>9}")
    for r in rows:
        b = base.get(r["P"])
        speed = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x" if b else "-"
        ttt = f"{r['time_to_target_s']:.1f} s" if r["time_to_target_s"] is not None else "not reached"
        gain = (f"{b['time_to_target_s'] / r['time_to_target_s']:.2f}x"
                if b and r["time_to_target_s"] and b["time_to_target_s"] else "-")
        print(f"{r['P']:>2} {r['strategy']:<14} {r['steps']:>5} {r['padding']:>8.1%} {r['imbalance']:>7.3f} "
              f"{r['imbalance_max']:>7.2f} {r['sync_wait_ms']:>7.1f} ms {r['imbalance_wait_ms']:>7.1f} ms "
              f"{r['step_ms']:>5.0f} ms {r['tokens_per_s']:>9,.0f} {speed:>8} {ttt:>12} {gain:>8} "
              f"{r['test_loss']:>9.3f}")


def plot(rows: list, out: str, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    procs = sorted({r["P"] for r in rows})
    fig, axes = plt.subplots(1, 1 + len(procs), figsize=(5 * (1 + len(procs)), 4))
    width = 0.8 / len(STRATEGIES)
    for i, s in enumerate(STRATEGIES):
        vals = [next((r["tokens_per_s"] for r in rows if r["P"] == p and r["strategy"] == s), 0) for p in procs]
        pads = [next((r["padding"] for r in rows if r["P"] == p and r["strategy"] == s), 0) for p in procs]
        bars = axes[0].bar(np.arange(len(procs)) + i * width, vals, width, label=s)
        for bar, pad in zip(bars, pads):
            axes[0].annotate(f"{pad:.0%} pad", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                             ha="center", va="bottom", fontsize=7)
    axes[0].set_xticks(np.arange(len(procs)) + width, [f"P = {p}" for p in procs])
    axes[0].set_ylabel("real target tokens / s")
    axes[0].legend()
    axes[0].set_title("throughput (labels: padding)")
    for ax, p in zip(axes[1:], procs):
        for s in STRATEGIES:
            r = next((r for r in rows if r["P"] == p and r["strategy"] == s), None)
            if r:
                t, loss = zip(*r["curve"])
                ax.plot(t, loss, label=s)
        ax.axhline(target, color="grey", ls=":", lw=1, label=f"target loss {target}")
        ax.set_xlabel("training time (s)")
        ax.set_ylabel("training loss")
        ax.set_title(f"GNMT-lite, P = {p}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=120)
    print(f"wrote {out}.png", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", default="2,4")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--global-batch", type=int, default=64, help="sentences per step over all ranks")
    ap.add_argument("--warmup-steps", type=int, default=30)
    ap.add_argument("--target-loss", type=float, default=2.0)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mpiexec", default=os.environ.get("MPIEXEC", "mpiexec"))
    add_output_args(ap, "bench_bucketing")
    a = ap.parse_args()
    if a.from_json:
        d = json.load(open(a.from_json))
        rows, a.target_loss = d["rows"], d["meta"]["target_loss"]
    else:
        rows = []
        for P in (int(p) for p in a.procs.split(",")):
            for s in a.strategies.split(","):
                print(f"P={P} {s} ...", file=sys.stderr, flush=True)
                rows.append(run(P, s, a))
        save(a.out, dict(vars(a), target_loss=a.target_loss), rows)
    report(rows, a.target_loss)
    if a.plot:
        plot(rows, a.out, a.target_loss)
    return 0


if __name__ == "__main__":
    sys.exit(main())
