"""Pipeline schedules: which forward (F), backward (B) and weight-gradient (W) op each stage runs,
in which order. One function per schedule, all with one signature, in the ``SCHEDULES`` registry:

    fn(stage, stages, micro_batches, chunks) -> [(kind, micro_batch, chunk), ...]

``kind`` is "F", "B" or "W"; ``chunk`` is this rank's virtual stage (0 unless interleaved: rank s
holds the global chunks s, s + p, s + 2p, ... - Narayanan et al. 2021's round-robin assignment).
In a schedule without "W" ops, "B" is the whole backward; in a split schedule (``fn.split``) "B" is
the input gradient only (``Module.backward_input``) and each "W" (``backward_weight``) comes later.
Each function also carries ``fn.rule(stages, m, chunks)`` (None, or why the sizes do not fit it),
``fn.bubble(stages, m, chunks, f, b, w)``: the idle share of a step by the paper's formula for op
times f, b, w (b, w: the input and weight parts of a backward), and ``fn.live(stage, stages, m,
chunks)``: the most micro-batch chunks whose activations stage s keeps at once (from F until its B,
or its W when split) by the schedule's closed form - ``kept`` counts it from the op list, and the
runtime's own ``Pipeline.stats["peak_live"]`` must equal both (tests).

``simulate`` runs the per-stage op lists against each other with the data dependencies (stage s's
F of a micro-batch needs the previous virtual stage's F, its B the next one's B, its W its own B)
and fixed op times: it finds a deadlock (an order that would hang), and gives the bubble a
schedule has in theory, which the benchmark compares with what it measures.
"""
from __future__ import annotations

from ...registry import Registry

SCHEDULES = Registry("pipeline schedule")


def _schedule(name: str, *, split: bool = False, rule=None, bubble=None, live=None):
    """Register `fn` under `name` with its divisibility rule, bubble and peak-live formulas."""
    def deco(fn):
        fn.split = split
        fn.rule = rule or _one_chunk
        fn.bubble = bubble or _flush_bubble
        fn.live = live
        return SCHEDULES.register(name)(fn)

    return deco


def _one_chunk(stages: int, m: int, chunks: int) -> str | None:
    if chunks != 1:
        return f"virtual stages (chunks) > 1 need the interleaved schedule; got {chunks} chunks"
    return None


def _flush_bubble(p: int, m: int, v: int, f: float = 1.0, b: float = 2.0, w: float = 0.0) -> float:
    """GPipe / 1F1B (Huang et al. 2019; Narayanan et al. 2021): (p - 1) / (m + p - 1)."""
    return (p - 1) / (m + p - 1)


@_schedule("gpipe", live=lambda s, p, m, v: m)
def gpipe(stage: int, stages: int, m: int, chunks: int = 1) -> list:
    """All m forwards, then all m backwards (Huang et al. 2019): m micro-batches alive at the peak."""
    return [("F", i, 0) for i in range(m)] + [("B", i, 0) for i in range(m)]


@_schedule("1f1b", live=lambda s, p, m, v: min(m, p - s))
def one_f_one_b(stage: int, stages: int, m: int, chunks: int = 1) -> list:
    """PipeDream-flush (Narayanan et al. 2021): p - s - 1 warm-up forwards, then one forward and one
    backward alternately, then the remaining backwards: at most p - s micro-batches alive."""
    warm = min(stages - stage - 1, m)
    ops = [("F", i, 0) for i in range(warm)]
    f, b = warm, 0
    while f < m:  # steady state: one forward, one backward
        ops += [("F", f, 0), ("B", b, 0)]
        f, b = f + 1, b + 1
    return ops + [("B", i, 0) for i in range(b, m)]  # cool-down


def _interleaved_rule(stages: int, m: int, chunks: int) -> str | None:
    if chunks < 2:
        return f"the interleaved schedule needs --virtual-stages >= 2 (got {chunks}); use 1f1b for one chunk"
    if m % stages:
        return (f"the interleaved schedule runs micro-batches in groups of the {stages} stages: micro-batches "
                f"({m}) must be a multiple of {stages} (Narayanan et al. 2021)")
    return None


def _interleaved_bubble(p: int, m: int, v: int, f: float = 1.0, b: float = 2.0, w: float = 0.0) -> float:
    """Narayanan et al. 2021, section 2.2.2: the bubble shrinks V-fold to (p - 1)/V of a micro-batch's
    full-model time, against m of them of work: (p - 1) / (V m + p - 1) of the step."""
    return (p - 1) / (v * m + p - 1)


def _interleaved_warm(stage: int, p: int, m: int, v: int) -> int:
    """Warm-up forwards of the interleaved schedule (Megatron-LM's count)."""
    return m * v if m == p else min(2 * (p - stage - 1) + (v - 1) * p, m * v)


@_schedule("interleaved", rule=_interleaved_rule, bubble=_interleaved_bubble,
           live=lambda s, p, m, v: min(m * v, _interleaved_warm(s, p, m, v) + 1))
def interleaved(stage: int, stages: int, m: int, chunks: int = 2) -> list:
    """Interleaved 1F1B (Narayanan et al. 2021; Megatron-LM's forward_backward_pipelining_with_
    interleaving): forward ops go through the chunks p micro-batches at a time (k-th forward: chunk
    (k // p) % V, micro-batch (k // pV) p + k % p), backwards the same with the chunks reversed;
    2 (p - s - 1) + (V - 1) p warm-up forwards (all of them if m == p), then 1F1B, then cool-down."""
    p, v, total = stages, chunks, m * chunks

    def op(kind: str, k: int) -> tuple:
        c = (k % (p * v)) // p
        return kind, (k // (p * v)) * p + k % p, c if kind == "F" else v - 1 - c

    warm = _interleaved_warm(stage, p, m, v)
    ops = [op("F", k) for k in range(warm)]
    for k in range(total - warm):
        ops += [op("F", warm + k), op("B", k)]
    return ops + [op("B", k) for k in range(total - warm, total)]


def _zb_bubble(p: int, m: int, v: int, f: float = 1.0, b: float = 1.0, w: float = 1.0) -> float:
    """ZB-H1 (Qi et al. 2023, section 3.1): (p - 1)(T_F + T_B - T_W) idle per stage against
    m (T_F + T_B + T_W) of work - a third of 1F1B's bubble when the three are equal."""
    idle = (p - 1) * (f + b - w)
    return idle / (m * (f + b + w) + idle)


@_schedule("zb1", split=True, bubble=_zb_bubble, live=lambda s, p, m, v: min(m, p))
def zb_h1(stage: int, stages: int, m: int, chunks: int = 1) -> list:
    """ZB-H1 (Qi et al. 2023, figure 3): 1F1B's order of F and B, with stage s's W lagging s
    backwards behind its B - in steady state stage s runs the W of micro-batch i - s after the B of
    micro-batch i, and the s W it still owes fill the cool-down. The B chain then returns faster
    (a stage sends dx without waiting for W), and a stage holds at most (p - s) + s = p micro-batches
    whose W has not run: the peak memory of 1F1B's first stage, the maximum over stages."""
    lag = min(stage, m)
    ops, w = [], 0
    for kind, i, c in one_f_one_b(stage, stages, m):
        ops.append((kind, i, c))
        if kind == "B" and i >= lag:  # the W of the micro-batch `lag` backwards ago
            ops.append(("W", w, 0))
            w += 1
    return ops + [("W", i, 0) for i in range(w, m)]


def _zb2_lag(stage: int, p: int, m: int) -> int:
    """The W a ZB-H2 stage owes at the end: ZB-H1's s, plus up to s more once m exceeds p."""
    return stage + min(stage, max(0, m - p))


def _zb2_bubble(p: int, m: int, v: int, f: float = 1.0, b: float = 1.0, w: float = 1.0) -> float:
    """ZB-H2 with a synchronous step (Qi et al. 2023, section 3.1: (p - 1)(T_F + T_B - 2 T_W) with
    their post-validation; without it the last stage cannot start before (p - 1) T_F, which then is
    the floor): (p - 1) max(T_F, T_F + T_B - 2 T_W) idle per stage for m >= 2p - 1 (below that the
    extra warm-up has no room and the idle is ZB-H1's); the simulator's value, tested."""
    if m < 2 * p - 1:
        return _zb_bubble(p, m, v, f, b, w)
    idle = (p - 1) * max(f, f + b - 2 * w)
    return idle / (m * (f + b + w) + idle)


@_schedule("zb2", split=True, bubble=_zb2_bubble, live=lambda s, p, m, v: min(m, 2 * p - 1))
def zb_h2(stage: int, stages: int, m: int, chunks: int = 1) -> list:
    """ZB-H2 (Qi et al. 2023, figure 4), synchronous: 2 (p - s) - 1 warm-up forwards (2p - 1 in
    flight on the first stage, twice 1F1B's), then B, W, F in turn, the W lagging `_zb2_lag`
    backwards behind its B, then the remaining B and W, and the owed W last. The extra forwards
    give every stage work while a backward is on its way, so the hand-offs between stages leave the
    critical path (the simulator with `latency`); the W lag 2s (ZB-H1's s, doubled) lets the B
    chain reach the first stage as in ZB-H1. Every stage keeps at most 2p - 1 micro-batches whose
    W has not run (``live``)."""
    warm, lag = min(m, 2 * (stages - stage) - 1), min(_zb2_lag(stage, stages, m), m)
    ops = [("F", i, 0) for i in range(warm)]
    f, b, w = warm, 0, 0
    while b < m:
        ops.append(("B", b, 0))
        b += 1
        if b > lag:  # the W of the micro-batch `lag` backwards ago
            ops.append(("W", w, 0))
            w += 1
        if f < m:
            ops.append(("F", f, 0))
            f += 1
    return ops + [("W", i, 0) for i in range(w, m)]


def kept(ops, split: bool) -> int:
    """The most micro-batch chunks an op list keeps at once: each F adds one, each B releases one
    (in a split schedule the W does: B leaves W's inputs)."""
    live = peak = 0
    for kind, _, _ in ops:
        live += 1 if kind == "F" else (0 if split and kind == "B" else -1)
        peak = max(peak, live)
    return peak


def problem(name: str, stages: int, m: int, chunks: int) -> str | None:
    """Why schedule `name` cannot run p = `stages`, m, V = `chunks` (None if it can)."""
    bad = SCHEDULES.problem(name)
    if bad:
        return bad
    if not isinstance(chunks, int) or chunks < 1:
        return f"virtual stages must be a positive int, got {chunks!r}"
    return SCHEDULES[name].rule(stages, m, chunks)


def simulate(name, stages: int, m: int, chunks: int = 1, f: float = 1.0, b: float = 2.0,
             w: float = 0.0, latency: float = 0.0, overhead: float = 0.0, op_times: dict | None = None) -> dict:
    """Play schedule `name` (or a function of the schedule signature) with op times f (forward), b (backward, or its input part when split), w
    (the weight part; in an unsplit schedule "B" costs b + w). Each of f, b, w is one time for
    every chunk, or a list of one per global chunk g = c p + s (unequal stages: a benchmark's
    measured op times). `latency`: the time a message takes from one rank to the next (the
    formulas take it as 0; interleaved sends V times as many along the critical path).
    `overhead`: the runtime's own time per op on its rank (receive, bookkeeping, send: not compute,
    so not busy), one time or one per stage; an op's result is ready `overhead` + its cost after it
    starts (a benchmark's measured ``Pipeline.stats["runtime_s"]`` per op). `op_times`: {(stage,
    kind, micro-batch, chunk): seconds} overriding single ops' costs - a step replayed with every
    op's own measured compute time (``Pipeline(trace=True)``), so that what the ops' unequal or
    jittered times cost is told apart from what the runtime between them costs. Raises
    RuntimeError on a deadlock.

    Returns:
        dict(makespan, bubble (idle share of the step's span, mean over the stages),
        ops: {stage: [(kind, mb, chunk, start)]}).
    """
    fn = SCHEDULES[name] if isinstance(name, str) else name
    n = stages * chunks
    f, b, w = ([float(t)] * n if isinstance(t, (int, float)) else list(t) for t in (f, b, w))
    costs = {"F": f, "B": [bi + (0 if fn.split else wi) for bi, wi in zip(b, w)], "W": w}
    extra = [float(overhead)] * stages if isinstance(overhead, (int, float)) else list(overhead)
    lists = {s: fn(s, stages, m, chunks) for s in range(stages)}
    mine = op_times or {}

    def cost(s, kind, i, c):
        return mine.get((s, kind, i, c), costs[kind][c * stages + s])

    last = stages * chunks - 1
    done, pos, free = {}, dict.fromkeys(range(stages), 0), dict.fromkeys(range(stages), 0.0)
    timed = {s: [] for s in range(stages)}

    def ready(s, kind, i, c):
        g = c * stages + s  # the global virtual stage
        hop = latency if stages > 1 else 0.0  # consecutive global chunks live on different ranks
        if kind == "F":
            prev = 0.0 if g == 0 else done.get(("F", i, g - 1))
            return prev if g == 0 or prev is None else prev + hop
        if kind == "B":
            mine = done.get(("F", i, g))
            nxt = mine if g == last else done.get(("B", i, g + 1))
            return None if mine is None or nxt is None else max(mine, nxt + (0.0 if g == last else hop))
        return done.get(("B", i, g))

    progress = True
    while progress:
        progress = False
        for s in range(stages):
            while pos[s] < len(lists[s]):
                kind, i, c = lists[s][pos[s]]
                t = ready(s, kind, i, c)
                if t is None:
                    break
                start = max(t, free[s])
                free[s] = done[(kind, i, c * stages + s)] = start + extra[s] + cost(s, kind, i, c)
                timed[s].append((kind, i, c, start))
                pos[s] += 1
                progress = True
    stuck = {s: lists[s][pos[s]] for s in range(stages) if pos[s] < len(lists[s])}
    if stuck:
        raise RuntimeError(f"schedule {name!r} deadlocks at p={stages} m={m} V={chunks}: waiting ops {stuck}")
    span = max(free.values())
    busy = [sum(cost(s, k, i, c) for k, i, c in lists[s]) for s in range(stages)]
    return dict(makespan=span, bubble=1 - sum(busy) / (stages * span) if span else 0.0, ops=timed)
