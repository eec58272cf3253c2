"""Wait-for graph over the stall inspector's answers: find a circular wait between ranks.

A collective completes only when every member has issued it. Rank 0 blocked in a call on one
communicator while rank 1 is blocked in a call on another that rank 0 has not issued (the
blocking and the asynchronous lane of one group, or two groups used in swapped order) is a
deadlock MPI cannot see: each call only ever looks at its own communicator, so the signature
check never compares the two. The stall inspector already asks every rank where it is; this
module turns those answers into the wait-for graph of the AND model and looks for a cycle
(Chandy, Misra and Haas, "Distributed deadlock detection", ACM TOCS 1(2), 1983: their probes
chase the same edges; here every rank's answer is at hand, so the chase is a local search).

An answer (``stall.wait_state``) says, per rank: ``blocked`` - the main thread cannot issue
anything until a call completes (it is inside a tracked collective, or waits on an asynchronous
handle without a timeout); ``issued`` - how many calls it has issued per group lane; ``ops`` -
the calls in flight on its threads, as (group key, sequence number, members, description).
Edge r -> s: r is blocked and one of r's calls in flight has member s, which has not issued it
yet (s's issued count on that lane is below the call's number). A rank that is computing is not
blocked and has no edges; a call whose members have all issued it waits for nobody (it may be
slow, it is progressing). A cycle through blocked ranks is a deadlock: each waits for the next,
which cannot issue the call before its own wait ends. The caller confirms a cycle twice, a grace
period apart, with the very same calls in it (stall.Watchdog._check_cycles): answers are taken
at slightly different moments on different ranks.
"""
from __future__ import annotations


def edges(states: dict) -> dict:
    """The wait-for graph of `states` (world rank -> answer; ranks that did not answer are
    absent and wait for nobody, known to nobody).

    Returns:
        dict rank -> {rank it waits for: (group key, sequence number, description of the call)}.

    Example:
        >>> s = {0: {"blocked": True, "issued": {"w:b": 1}, "ops": [("w:b", 1, (0, 1), "allreduce")]},
        ...      1: {"blocked": True, "issued": {"w:a": 1}, "ops": [("w:a", 1, (0, 1), "allreduce (async)")]}}
        >>> edges(s)[0]
        {1: ('w:b', 1, 'allreduce')}
    """
    out: dict = {}
    for r, st in states.items():
        if not st or not st.get("blocked"):
            continue
        mine = out.setdefault(r, {})
        for gkey, seq, ranks, what in st.get("ops", ()):
            if not gkey:
                continue  # a point-to-point wait has no call count to compare
            for s in ranks:
                o = states.get(s)
                if s != r and o is not None and o.get("issued", {}).get(gkey, 0) < seq:
                    mine.setdefault(s, (gkey, seq, what))
    return out


def cycle_through(me: int, states: dict) -> list | None:
    """A circular wait through rank `me`: the ranks [me, r1, ..., rk] with me -> r1 -> ... ->
    rk -> me in the wait-for graph of `states`, or None (also when `me` is not blocked)."""
    g = edges(states)
    if me not in g:
        return None
    # depth-first search for a path back to `me` (a few ranks at most have edges: cheap)
    stack, seen = [(me, [me])], {me}
    while stack:
        r, path = stack.pop()
        for s in g.get(r, {}):
            if s == me:
                return path
            if s not in seen and s in g:
                seen.add(s)
                stack.append((s, path + [s]))
    return None


def describe(me: int, path: list, states: dict) -> str:
    """One sentence naming every call of the cycle `path` (from cycle_through) and who it waits for."""
    g = edges(states)
    parts = []
    for i, r in enumerate(path):
        s = path[(i + 1) % len(path)]
        gkey, seq, what = g[r][s]
        parts.append(f"rank {r} waits in {what} for rank {s}, which has not issued it")
    return ("circular wait between ranks " + ", ".join(map(str, path)) + ": " + "; ".join(parts) +
            " - no rank can go on (the ranks issued collectives on different groups or lanes "
            "(blocking / asynchronous) in different orders)")


def key(path: list, states: dict) -> tuple:
    """What must be the same at the confirmation: the calls of the cycle, edge by edge."""
    g = edges(states)
    return tuple((r, g[r][path[(i + 1) % len(path)]][:2]) for i, r in enumerate(path))
