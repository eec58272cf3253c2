"""Time and bytes to a target test accuracy for each --sync mode (issue 18), with and without a
straggler, on shared memory and on an emulated cluster.

    python scripts/bench_sync.py --plot                               # defaults, shared memory
    python scripts/bench_sync.py --networks shm,emulated --plot       # + the 1 Gbit/s cluster (root)
    python scripts/bench_sync.py --modes sync,local:4,ssp:2 --seeds 0 # any SYNC_MODES names
    python scripts/bench_sync.py --from-json results/bench_sync.json --plot

Every (network, straggler, seed, mode) is one run of the main job (``python -m disttrain.train``,
MLP on the digits, --eval-every E): the training time (evaluation excluded) and steps until the
test accuracy first reaches --target, the bytes this rank sent per step (``bytes_sent_per_step``,
gradient allreduces and the mode's own exchange) times those steps, and the mean wait per step.
A mode is ``NAME[:PARAM][+COMPRESSOR]`` (``sync+powersgd:2`` = --sync sync --compression
powersgd:2); names are checked against ``disttrain.parallel.sync.SYNC_MODES``, so modes
registered later (the parameter servers' ``async``, ``ssp:S``) are measured by naming them, and
join the default list when registered. The modes of one (network, straggler, seed) run one after
another, interleaved, so drift of this shared machine's load hits them alike; speed-ups are
against ``sync`` in the same (network, straggler) cell.

Networks: ``shm`` = --procs ranks on this host (shared memory); ``emulated`` =
launchers/emulated_cluster.sh --hosts H --ranks-per-host K --rate R (network namespaces, tc
token bucket; needs root): ranks on different hosts talk TCP over the shaped links.
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

from _bench import ROOT, add_output_args, save, saved, worker_env

sys.path.insert(0, ROOT)
from disttrain.parallel.sync import SYNC_MODES  # noqa: E402  (after the path: run from a checkout)

LAUNCH = os.path.join(ROOT, "launchers", "emulated_cluster.sh")
BASE = "sync,sync+powersgd:2,local:2,local:4,local:8,hybrid:2"
LATER = ("ssp:2", "async")  # the parameter-server modes, in the default list once registered


def default_modes() -> str:
    return ",".join([BASE] + [m for m in LATER if m.partition(":")[0] in SYNC_MODES])


def parse_mode(spec: str) -> tuple:
    """("local:4", "none") of "local:4"; ("sync", "powersgd:2") of "sync+powersgd:2"."""
    sync, _, comp = spec.partition("+")
    problem = SYNC_MODES.problem(sync)
    if problem:
        raise SystemExit(f"bench_sync: mode {spec!r}: {problem}")
    return sync, comp or "none"


def launcher(net: str, a) -> list:
    if net == "shm":
        mpiexec = shutil.which("mpiexec") or os.path.join(os.path.dirname(sys.executable), "mpiexec")
        return [mpiexec, "-n", str(a.procs), sys.executable]
    return ["env", f"PYTHON={sys.executable}", LAUNCH, "--hosts", str(a.hosts), "--ranks-per-host",
            str(a.ranks_per_host), "--rate", a.rate, "--"]


def one_run(a, net: str, mode: str, straggler: str, seed: int, tmp: str) -> dict:
    """One main-job run; its time, steps and bytes to --target (None where not reached)."""
    sync, comp = parse_mode(mode)
    path = os.path.join(tmp, "m.jsonl")
    cmd = launcher(net, a) + ["-m", "disttrain.train", "--sync", sync, "--compression", comp, "--seed", str(seed),
                              "--steps", str(a.steps), "--hidden", a.hidden, "--global-batch-size", str(a.batch),
                              "--eval-every", str(a.eval_every), "--log-every", str(a.eval_every), "--metrics", path]
    if straggler != "none":
        cmd += ["--straggler", straggler]
    t = time.perf_counter()
    out = subprocess.run(cmd, env=worker_env(a.threads, throttle=a.throttle), capture_output=True, text=True,
                         timeout=a.timeout)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    recs = [json.loads(ln) for ln in open(path) if ln.strip()]
    final = next(r for r in recs if r.get("final"))
    evals = [r for r in recs if "test_accuracy" in r and "train_time_s" in r]
    logged = [r for r in recs if "loss" in r]
    hit = next((r for r in evals if r["test_accuracy"] >= a.target), None)
    # bytes to the target: the logged intervals up to the hit (one interval per eval: same period)
    per_step = [r["bytes_sent_per_step"] for r in logged]
    sent = sum(b * a.eval_every for r, b in zip(logged, per_step) if hit and r["step"] <= hit["step"])
    return dict(network=net, mode=mode, straggler=straggler, seed=seed, test_accuracy=final["test_accuracy"],
                time_to_target_s=hit["train_time_s"] if hit else None, steps_to_target=hit["step"] if hit else None,
                bytes_to_target=sent if hit else None, train_time_s=logged[-1]["train_time_s"],
                wait_s=statistics.mean(r["wait_s"] for r in logged),
                bytes_per_step=statistics.mean(per_step), wall_s=time.perf_counter() - t)


def measure(a) -> list:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for net in a.networks:
            for st in a.stragglers:
                for seed in a.seeds:
                    for mode in a.modes:  # interleaved: the load's drift hits every mode alike
                        r = one_run(a, net, mode, st, seed, tmp)
                        rows.append(r)
                        tt = r["time_to_target_s"]
                        print(f"  {net:8s} straggler {st:5s} seed {seed} {mode:16s} acc {r['test_accuracy']:.4f} "
                              f"{a.target:.0%} after {r['steps_to_target']} steps / "
                              f"{tt if tt is not None else float('nan'):.2f} s, wait {1e3 * r['wait_s']:.1f} ms/step, "
                              f"{r['bytes_per_step'] / 1024:,.0f} KiB/step ({r['wall_s']:.0f} s wall)", flush=True)
    return rows


def summarize(rows: list, target: float) -> list:
    out = []
    for key in dict.fromkeys((r["network"], r["straggler"], r["mode"]) for r in rows):
        rs = [r for r in rows if (r["network"], r["straggler"], r["mode"]) == key]
        ok = [r for r in rs if r["time_to_target_s"] is not None]
        med = (lambda k: statistics.median(r[k] for r in ok)) if len(ok) == len(rs) else (lambda k: None)
        out.append(dict(network=key[0], straggler=key[1], mode=key[2], seeds=len(rs), reached=len(ok),
                        accuracy=statistics.mean(r["test_accuracy"] for r in rs),
                        time_to_target_s=med("time_to_target_s"),
                        steps_to_target=med("steps_to_target"), bytes_to_target=med("bytes_to_target"),
                        wait_ms=1e3 * statistics.median(r["wait_s"] for r in rs),
                        kib_per_step=statistics.median(r["bytes_per_step"] for r in rs) / 1024, target=target))
    for s in out:
        base = next((b for b in out if (b["network"], b["straggler"], b["mode"]) == (s["network"], s["straggler"],
                                                                                   "sync")), None)
        ok = base and base["time_to_target_s"] and s["time_to_target_s"]
        s["speedup_vs_sync"] = base["time_to_target_s"] / s["time_to_target_s"] if ok else None
    return out


def report(meta: dict, summary: list) -> None:
    f = lambda v, fmt: format(v, fmt) if v is not None else "-"
    print(f"\nTime to {meta['target']:.0%} test accuracy: MLP {meta['hidden']} on digits, global batch "
          f"{meta['batch']}, {meta['steps']} steps, {meta['procs']} ranks, seeds {meta['seeds']} (medians); "
          f"load {meta['load']}")
    print("| network | straggler | mode | reached | accuracy | steps to target | time to target s | vs sync "
          "| MiB sent to target (per rank) | KiB/step | wait ms/step |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in summary:
        mib = r["bytes_to_target"] / 2 ** 20 if r["bytes_to_target"] is not None else None
        print(f"| {r['network']} | {r['straggler']} | {r['mode']} | {r['reached']}/{r['seeds']} | "
              f"{r['accuracy']:.4f} | "
              f"{f(r['steps_to_target'], '.0f')} | {f(r['time_to_target_s'], '.2f')} | "
              f"{f(r['speedup_vs_sync'], '.2f')}{'x' if r['speedup_vs_sync'] else ''} | {f(mib, '.2f')} | "
              f"{r['kib_per_step']:,.0f} | {r['wait_ms']:.1f} |")


def plot(summary: list, path: str, meta: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cells = list(dict.fromkeys((r["network"], r["straggler"]) for r in summary))
    modes = list(dict.fromkeys(r["mode"] for r in summary))
    fig, axes = plt.subplots(1, 2, figsize=(15, 4.5))
    w = 0.8 / max(1, len(cells))
    for i, cell in enumerate(cells):
        by = {r["mode"]: r for r in summary if (r["network"], r["straggler"]) == cell}
        xs = [j + i * w for j in range(len(modes))]
        label = f"{cell[0]}, straggler {cell[1]}"
        axes[0].bar(xs, [by[m]["time_to_target_s"] or 0 for m in modes], w, label=label)
        axes[1].bar(xs, [(by[m]["bytes_to_target"] or 0) / 2 ** 20 for m in modes], w, label=label)
    for ax, title in zip(axes, (f"training time to {meta['target']:.0%} test accuracy (s; 0 = not reached)",
                                f"MiB one rank sent to {meta['target']:.0%}")):
        ax.set(title=title, xticks=[j + w * (len(cells) - 1) / 2 for j in range(len(modes))], xticklabels=modes)
        ax.tick_params(axis="x", rotation=30)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", default=default_modes(),
                    help=f"comma-separated MODE[+COMPRESSOR] (default {default_modes()})")
    ap.add_argument("--stragglers", default="none,1:3", help="comma-separated: none and/or RANK:FACTOR")
    ap.add_argument("--networks", default="shm", help="shm and/or emulated (root: network namespaces)")
    ap.add_argument("--procs", type=int, default=4, help="ranks on shared memory")
    ap.add_argument("--hosts", type=int, default=2)
    ap.add_argument("--ranks-per-host", type=int, default=2)
    ap.add_argument("--rate", default="1gbit", help="emulated link rate, tc syntax")
    ap.add_argument("--hidden", default="256,256", help="MLP hidden widths (the main job's --hidden)")
    ap.add_argument("--batch", type=int, default=64, help="global batch size")
    ap.add_argument("--steps", type=int, default=300, help="steps per run (the cosine schedule's length too)")
    ap.add_argument("--eval-every", type=int, default=8,
                    help="evaluate every N steps (a multiple of each mode's exchange period)")
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-throttle", dest="throttle", action="store_false",
                    help="do not set MPICH's yielding progress (set by default: ranks share the cores here)")
    add_output_args(ap, "bench_sync")
    a = ap.parse_args(argv)
    if a.from_json:
        doc, png = saved(a)
        report(doc["meta"], doc["summary"])
        if png:
            plot(doc["summary"], png, doc["meta"])
        return 0
    a.modes = a.modes.split(",")
    for m in a.modes:
        parse_mode(m)  # every name checked before the first run
    if "sync" not in a.modes:
        a.modes.insert(0, "sync")  # every speed-up is against it
    a.stragglers, a.networks = a.stragglers.split(","), a.networks.split(",")
    a.seeds = [int(s) for s in a.seeds.split(",")]
    if "emulated" in a.networks and os.geteuid() != 0:
        print("network 'emulated' needs root (network namespaces); measuring shared memory only", file=sys.stderr)
        a.networks = [n for n in a.networks if n != "emulated"]
    meta = dict(hidden=a.hidden, batch=a.batch, steps=a.steps, procs=a.procs, hosts=a.hosts,
                ranks_per_host=a.ranks_per_host, rate=a.rate, seeds=a.seeds, target=a.target,
                eval_every=a.eval_every, load=" ".join(f"{x:.1f}" for x in os.getloadavg()),
                host=f"{os.cpu_count()} cores", python=sys.version.split()[0])
    rows = measure(a)
    summary = summarize(rows, a.target)
    meta["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    save(a.out, meta, rows, dict(summary=summary))
    report(meta, summary)
    if a.plot:
        plot(summary, a.out + ".png", meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
