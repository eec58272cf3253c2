"""Job-level randomized check, run by hand (not in the suite: each configuration is two jobs).

    python tests/fuzz_job.py SEED COUNT [--kind valid|invalid|resume] [--focus any|pipeline] [--out DIR]

valid: a random configuration of `python -m disttrain.train` (model, --dp/--pp/--tp mesh, --shard,
  schedule, --recompute, algorithm, buckets, optimizer, ...) at float64 on 2-5 ranks against the
  same configuration in ONE process: the logged losses and the final test metrics must agree to
  rel 1e-9 where the mode is exact (sync SGD without compression). Compression and --sync
  local/hybrid are not exact against one process (a lossy gradient; replicas that drift between
  exchanges): they must only finish with finite losses.
invalid: a valid configuration with one flag broken: every rank must end (exit 2) within a
  bounded time with one message, no traceback.
resume: a run under layout A stops after k steps with a checkpoint, a run under layout B resumes
  it; the resumed losses must be the uninterrupted one-process run's.
Prints one line per configuration ("ok", "inexact-ok", "FAIL ...") and a summary.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from tests._mpirun import run  # noqa: E402 - the suite's launcher (oversubscription settings)

MODELS = {"mlp": ["--hidden", "24,12"],
          "gnmt": ["--hidden", "6,12,1", "--vocab-size", "60", "--max-tokens", "0"],
          "transformer": ["--hidden", "24,12,2", "--vocab-size", "60", "--seq-len", "8"],
          "dlrm": ["--tables", "50,20,7", "--samples", "600", "--hidden", "4,12,12"]}
EXACT_TOL = 1e-9


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def draw(rng, focus="any"):
    """(ranks, flags that shape the run, flags that only lay it out, exact?). focus "pipeline": a
    pipeline of 2-5 stages (pp up to the rank count, not only 2-3), mostly interleaved (V 2-3) and
    zb1, and gnmt under a token budget - micro-batches of uneven sizes (attack8)."""
    pipe = focus == "pipeline"
    model = str(rng.choice(list(MODELS)))
    n = int(rng.integers(2, 6))
    tp = int(rng.choice([d for d in divisors(n) if d <= 4 and (model != "gnmt" or 60 % d == 0)])) if not pipe else 1
    pp = int(rng.choice([d for d in divisors(n // tp) if (d <= 3 if not pipe else d >= 2)]))
    dp = n // (pp * tp)
    m = int(rng.integers(1, 5))
    layout = ["--dp", str(dp), "--pp", str(pp), "--tp", str(tp)]
    if pp > 1:
        sched = str(rng.choice(["gpipe", "1f1b", "interleaved", "zb1"], p=[0.1, 0.1, 0.5, 0.3] if pipe else None))
        if sched == "interleaved":
            m = pp * int(rng.integers(1, 3))
            layout += ["--virtual-stages", str(int(rng.integers(2, 4)) if pipe else 2)]
        layout += ["--schedule", sched, "--micro-batches", str(m),
                   "--recompute", str(rng.choice(["none", "full", "selective"]))]
    else:
        m = 1
        layout += ["--shard", str(rng.choice(["none", "optimizer", "gradients", "full"]))]
    layout += ["--algorithm", str(rng.choice(["auto", "ring", "tree", "double_tree", "butterfly", "rabenseifner",
                                              "ps", "mpi"])),
               "--bucket-mb", str(rng.choice([25, 0.001, 0.01])), "--overlap" if rng.random() < 0.5 else "--no-overlap"]
    if model == "dlrm":
        layout += ["--sharding", str(rng.choice(["table", "row"])),
                   "--alltoall-algorithm", str(rng.choice(["auto", "pairwise", "bruck", "mpi"]))]
    gbs = dp * m * int(rng.integers(1, 4)) + (int(rng.integers(0, dp)) if pp == 1 and model != "gnmt" else 0)
    if pipe:  # a batch most layouts divide (1-6, 8, 10, 12 micro-batches per replica at dp <= 2): resumes
        gbs = 120  # under another layout are then run rather than refused
    opt = str(rng.choice(["sgd", "adam", "adamw", "lamb"] if model != "dlrm" else ["sgd", "adam", "adamw"]))
    extra = list(MODELS[model])
    if pipe:  # enough layers for 5 stages x 3 chunks (the zoo's defaults refuse most deep pipelines)
        deep = {"mlp": "24," + ",".join(["12"] * 13), "gnmt": "6,12,6", "transformer": "24,12,8"}
        if model in deep:
            extra[extra.index("--hidden") + 1] = deep[model]
        if model == "gnmt" and rng.random() < 0.6:  # a token budget: sentences per step vary
            extra[extra.index("--max-tokens") + 1] = str(int(rng.integers(40, 120)))
    run_flags = ["--model", model, *extra, "--steps", "4", "--log-every", "1", "--dtype", "float64",
                 "--global-batch-size", str(gbs), "--optimizer", opt, "--seed", str(int(rng.integers(100))),
                 "--warmup-steps", "1"]
    if "--shard" in layout and layout[layout.index("--shard") + 1] != "none" and \
            layout[layout.index("--algorithm") + 1] not in ("auto", "ring", "mpi"):
        layout[layout.index("--algorithm") + 1] = "ring"  # the shard modes reduce-scatter (a refusal otherwise)
    exact = True
    if rng.random() < 0.15 and "--shard" in layout and layout[layout.index("--shard") + 1] in ("none", "optimizer"):
        run_flags += ["--compression", str(rng.choice(["fp16", "bf16", "topk:0.5", "onebit", "powersgd:1"]))]
        layout[layout.index("--algorithm") + 1] = "auto"  # the compressors bring their own exchange
        exact = False
    if rng.random() < 0.1 and pp == 1 and tp == 1 and "--compression" not in run_flags:
        run_flags += ["--sync", str(rng.choice(["local:2", f"hybrid:{max(1, dp // 2)}"]))]
        exact = False
    return n, run_flags, layout, exact


def metrics(path):
    recs = [json.loads(ln) for ln in open(path)]
    return [r["loss"] for r in recs if "loss" in r], {k: v for k, v in recs[-1].items() if "test" in k}


def job(n, flags, out, timeout=180):
    t = time.monotonic()
    res = run(n, ["-m", "disttrain.train", *flags, "--metrics", out], timeout=timeout,
              env={"DISTTRAIN_COSTMODEL": "defaults"})
    return res, time.monotonic() - t


def close(a, b, tol):
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=tol, abs_tol=1e-12) for x, y in zip(a, b))


def valid(rng, d, tag, focus="any"):
    n, flags, layout, exact = draw(rng, focus)
    res, took = job(n, flags + layout, f"{d}/{tag}-n.jsonl")
    cmd = f"n={n} {' '.join(flags + layout)}"
    if res.returncode == 2 and "configuration error" in res.stdout and "Traceback" not in res.stdout:
        return f"refused ({took:.0f} s) {res.stdout.strip().splitlines()[-1][:160]} :: {cmd}"  # reviewed by hand
    if res.returncode != 0:
        return f"FAIL rc {res.returncode} ({took:.0f} s): {cmd}\n{res.stdout[-3000:]}"
    got = metrics(f"{d}/{tag}-n.jsonl")
    if not all(map(math.isfinite, got[0])):
        return f"FAIL non-finite losses {got[0]}: {cmd}"
    if not exact:
        return f"inexact-ok {cmd}"
    dp = int(layout[layout.index("--dp") + 1])
    if "--max-tokens" in flags and flags[flags.index("--max-tokens") + 1] != "0" and dp > 1:
        # the token budget is per rank, so dp replicas draw another global batch than one process
        # does: the oracle is then plain data parallelism at the same dp (no pipeline, no tp)
        ref, _ = job(dp, flags + ["--dp", str(dp), "--pp", "1", "--tp", "1"], f"{d}/{tag}-1.jsonl")
    else:
        ref, _ = job(1, flags, f"{d}/{tag}-1.jsonl")
    if ref.returncode != 0:
        return f"FAIL reference rc {ref.returncode}: {cmd}\n{ref.stdout[-2000:]}"
    want = metrics(f"{d}/{tag}-1.jsonl")
    if not close(got[0], want[0], EXACT_TOL) or not close(list(got[1].values()), list(want[1].values()), EXACT_TOL):
        return f"FAIL losses {got} != reference {want}: {cmd}"
    return f"ok {cmd}"


BREAK = [("--steps", "0"), ("--steps", "x"), ("--global-batch-size", "0"), ("--lr", "nan"), ("--lr", "-1"),
         ("--micro-batches", "0"), ("--tp", "7"), ("--pp", "9"), ("--dp", "7"), ("--shard", "zero4"),
         ("--compression", "topk:2"), ("--compression", "powersgd:0"), ("--sync", "local:0"), ("--sync", "ssp:-1"),
         ("--algorithm", "bogus"), ("--schedule", "zigzag"), ("--virtual-stages", "0"), ("--hidden", "0,4"),
         ("--bucket-mb", "0"), ("--bucket-mb", "inf"), ("--momentum", "1"), ("--seq-len", "0"),
         ("--vocab-size", "1"), ("--max-tokens", "-1"), ("--model", "resnet"), ("--dtype", "float16"),
         ("--checkpoint-every", "-1"), ("--straggler", "9:2"), ("--straggler", "0:x"), ("--recompute", "some"),
         ("--tables", ""), ("--samples", "0"), ("--hybrid-period", "0"), ("--outer-lr", "0"), ("--sync", "hybrid:9"),
         ("--config", "/nonexistent.toml"), ("--metrics", "/nonexistent/dir/m.jsonl")]


def invalid(rng, d, tag, focus="any"):
    n, flags, layout, _ = draw(rng, focus)
    k, v = BREAK[int(rng.integers(len(BREAK)))]
    args = flags + layout
    if k in args:
        args[args.index(k) + 1] = v
    else:
        args += [k, v]
    res, took = job(n, args, f"{d}/{tag}-bad.jsonl", timeout=90)
    cmd = f"n={n} {' '.join(args)}"
    out = res.stdout
    if res.returncode == 0:
        return f"accepted (check by hand) {k} {v}: {cmd}"
    if res.returncode in (-9, 124) or took > 60:
        return f"FAIL hang/slow ({took:.0f} s, rc {res.returncode}): {cmd}\n{out[-2000:]}"
    if "Traceback" in out or res.returncode != 2:
        return f"FAIL rc {res.returncode}, traceback={'Traceback' in out}: {cmd}\n{out[-2500:]}"
    return f"ok-refused {k} {v} ({took:.0f} s): {out.strip().splitlines()[-1][:150]}"


def resume(rng, d, tag, focus="any"):
    n1, flags, lay1, exact = draw(rng, focus)
    n2, _, lay2, _ = draw(np.random.default_rng(rng.integers(1 << 30)), focus)
    if not exact:  # B takes A's flags (the run) with its own layout only
        return "skip (inexact mode)"
    ck = f"{d}/{tag}-ck"
    shutil.rmtree(ck, ignore_errors=True)
    a, _ = job(n1, flags + lay1 + ["--checkpoint-dir", ck, "--stop-after-steps", "2"], f"{d}/{tag}-a.jsonl")
    cmd = f"A n={n1} {' '.join(lay1)} -> B n={n2} {' '.join(lay2)} :: {' '.join(flags)}"
    if a.returncode == 2 and "configuration error" in a.stdout:
        return f"refused A {a.stdout.strip().splitlines()[-1][:160]} :: {cmd}"
    if a.returncode != 0:
        return f"FAIL A rc {a.returncode}: {cmd}\n{a.stdout[-2000:]}"
    b, _ = job(n2, flags + lay2 + ["--checkpoint-dir", ck, "--resume"], f"{d}/{tag}-b.jsonl")
    if b.returncode == 2 and "configuration error" in b.stdout:
        return f"refused B {b.stdout.strip().splitlines()[-1][:160]} :: {cmd}"
    if b.returncode != 0:
        return f"FAIL B rc {b.returncode}: {cmd}\n{b.stdout[-3000:]}"
    ref, _ = job(1, flags, f"{d}/{tag}-1.jsonl")
    got, want = metrics(f"{d}/{tag}-b.jsonl"), metrics(f"{d}/{tag}-1.jsonl")
    if not close(got[0], want[0][-len(got[0]):], EXACT_TOL) or len(got[0]) != 2:
        return f"FAIL resumed losses {got[0]} != one process {want[0]}: {cmd}"
    if not close(list(got[1].values()), list(want[1].values()), EXACT_TOL):
        return f"FAIL resumed test metrics {got[1]} != {want[1]}: {cmd}"
    return f"ok {cmd}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("seed", type=int)
    ap.add_argument("count", type=int)
    ap.add_argument("--kind", default="valid", choices=["valid", "invalid", "resume"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--focus", default="any", choices=["any", "pipeline"],
                    help="pipeline: 2-5 stages, interleaved V 2-3 / zb1, uneven micro-batches (gnmt token budgets)")
    a = ap.parse_args()
    d = a.out or tempfile.mkdtemp(prefix="fuzz-job-")
    os.makedirs(d, exist_ok=True)
    fails = 0
    for k in range(a.count):
        rng = np.random.default_rng([a.seed, k])
        line = {"valid": valid, "invalid": invalid, "resume": resume}[a.kind](rng, d, f"{a.seed}-{k}", a.focus)
        fails += line.startswith("FAIL")
        print(f"[{a.kind} seed {a.seed} #{k}] {line}", flush=True)
    print(f"fuzz_job: {a.count} {a.kind} configurations, {fails} failures", flush=True)


if __name__ == "__main__":
    main()
