"""Cross-rank consistency check: every rank must call the same collective with matching arguments.

Mismatches (shape, dtype, op, algorithm, root, ...) or a local argument error on any one rank would
otherwise hang the job or silently produce wrong numbers. The check is one tiny MPI_Iallreduce with
MPI_BAND over three int64 words ``[ok, h, ~h]`` where ``h`` is a 63-bit hash of the call's
signature and of its sequence number on the group (the n-th collective this rank issued there):
AND(h_i) == ~AND(~h_i) == OR(h_i) holds exactly when every h_i is equal, and the first word is 0
when any rank found a local error. Only when that fails do the ranks gather readable
descriptions (a pickled allgather, off the hot path) so that every rank raises the same
CollectiveError naming who passed what, at which call number, called from where.

The wait is interruptible: while the check is pending, a failure notice from a member (a rank
that raised an error it could not agree on with this group - an invalid ``group=`` - see
stall.undeliverable) or its departure ends the wait with that rank's CollectiveError instead of
a hang; the abandoned request makes the group unusable (stall.mark_broken), which every later
call on it says.
"""
from __future__ import annotations

import hashlib
import numbers
import os
import time

import numpy as np

from .. import groups, mpi, stall
from ..groups import group_of, local_size
from . import config, node
from .errors import CollectiveError


_hashes: dict = {}  # signature tuple -> 63-bit hash (repr + blake2b costs ~5 us; a lookup ~0.2 us)
_MASK = (1 << 63) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # Fibonacci hashing: spreads consecutive sequence numbers over all bits
_abandoned: list = []  # requests of interrupted checks: never freed while MPI may still write them
_FAST_SPINS = 50  # Test() calls (~0.1-0.3 us each) before the interruptible, bookkept wait


def _canon(v):
    """The plain Python spelling of an argument's value, so that values that compare equal hash
    alike on every rank: np.str_('sum') == 'sum' and np.int64(0) == 0 find one entry of the cache
    below but have different reprs, so whichever spelling a process hashed first decided its hash -
    a valid program raised "arguments differ" (attack5)."""
    if isinstance(v, str):
        return str.__str__(v)  # the characters: str() of a (str, Enum) member is 'Op.MAX' (review6)
    if isinstance(v, (numbers.Integral, np.bool_)):
        return int(v)
    if isinstance(v, numbers.Real):
        f = float(v)
        return int(f) if f.is_integer() else f  # 1.0 == 1: one spelling
    if isinstance(v, (tuple, list)):
        return tuple(_canon(e) for e in v)
    return v


def _hash(kind: str, fields: dict) -> int:
    sig = (kind, *fields.items())
    try:
        h = _hashes.get(sig)
    except TypeError:  # an unhashable field value: hash it uncached
        sig, h = None, None
    if h is None:
        # repr, not hash(): Python's str hashes are salted per process, so ranks would disagree.
        d = hashlib.blake2b(repr((kind, sorted(((k, _canon(v)) for k, v in fields.items()), key=str))).encode(), digest_size=8).digest()
        h = int.from_bytes(d, "little") >> 1  # 63 bits: a non-negative int64
        if sig is not None and len(_hashes) < 65536:
            _hashes[sig] = h
    return h


def check(comm, kind: str, fields: dict, local_error: str | None, always: bool = False, payload=None,
          h: int | None = None) -> bool:
    """Raise CollectiveError on every rank of `comm` if any rank has an error or a different signature.

    Args:
        comm: the MPI communicator the collective is about to use.
        kind: collective name ("allreduce", ...).
        fields: what must agree across ranks (shape, dtype, op, algorithm, root, ...).
        local_error: a message if this rank's own arguments are invalid, else None.
        always: check even when validation is switched off (set-up calls: meshes, pipelines,
            DataParallel - once per job, never in the hot loop).
        payload: None, or a uint8 array of at most node.SMALL bytes to carry in the same round
            (only on a communicator with node-local shared memory; see Returns).
        h: the signature's 63-bit hash when the caller computes it itself (it must be a function
            of `fields` alone, the same on every rank: api.py's allreduce shares it with its hot
            path); default: the hash of `fields`.

    Returns:
        True when `payload` travelled with the check: every rank's payload is then
        ``node.get(comm).payloads(len(payload))`` until the communicator's next collective.
    """
    if not (config.current().validate or always):
        if local_error:
            raise CollectiveError(local_error)
        return False
    op = stall.current()
    if op is None:  # a set-up check (new_group, DataParallel, Mesh, Pipeline): track it like a collective
        g = group_of(comm)
        temp = stall.enter(kind, None, group=g, lane="a" if g is not None and comm is g.async_comm else "b")
        try:
            return _check(comm, kind, fields, local_error, temp, payload, h)
        except BaseException as e:
            stall.leave(temp, e)
            raise
        finally:
            if stall.current() is temp:
                stall.leave(temp)
    return _check(comm, kind, fields, local_error, op, payload, h)


def agree_setting(kind: str, fields: dict) -> bool:
    """A collective setter's agreement (config.set_validation): the world's validated round with
    the new values, whatever the current setting - a rank that calls it alone, or with another
    value, meets its peers' round and every rank raises CollectiveError naming both calls.

    Returns:
        False before dt.init() (nothing to agree with yet), True once agreed.
    """
    w = groups.ready_world
    if w is None:
        return False
    check(w.comm, kind, fields, None, always=True)
    return True


def _check(comm, kind: str, fields: dict, local_error: str | None, op, payload=None, h=None) -> bool:
    seq = op.seq if op is not None and op.gkey else 0
    h = (_hash(kind, fields) if h is None else h) ^ ((seq * _GOLDEN) & _MASK)
    st = node.get(comm)
    if st is not None:  # one shared-memory round (node.py): ~1 us instead of an MPI_Iallreduce
        k = st.post(h, local_error is None, payload)
        if not st.done(k):
            _slow(st.request(k), comm, op, kind)
        if st.agreed(k, h):
            return payload is not None
        return _mismatch(comm, kind, fields, local_error, op, seq)
    v = np.array((0 if local_error else -1, h, ~h), dtype=np.int64)
    MPI = mpi.MPI
    req = comm.Iallreduce(MPI.IN_PLACE, v, op=MPI.BAND)
    for _ in range(_FAST_SPINS):  # the usual case: the peers are there; no bookkeeping per spin
        if req.Test():
            break
    else:
        _slow(req, comm, op, kind)
    if v[0] == -1 and v[1] == ~v[2]:
        if comm.Get_size() > 1 and not node.known(comm):
            # every rank passed this same check: from the next call on, validate in shared memory
            node.prepare(comm)
        return False
    return _mismatch(comm, kind, fields, local_error, op, seq)


def _slow(req, comm, op, kind: str) -> None:
    if op is not None:
        op.state = "validating"  # interruptible: the watchdog leaves this wait to wait()
    wait(req, comm, op, kind)
    if op is not None:
        op.state = "running"


def _mismatch(comm, kind: str, fields: dict, local_error: str | None, op, seq: int):
    """Every rank saw the check fail: gather readable descriptions and raise the same error."""
    site = op.site if op is not None else stall.call_site()
    infos = comm.allgather((local_error, kind, fields, seq, site))
    raise CollectiveError(describe(infos))


def wait(req, comm, op, kind: str) -> None:
    """Complete `req`, spinning briefly then sleeping in growing steps (a late peer gets the core
    when ranks outnumber cores), and give up with the peer's error if a member can never come.
    Any other exception out of the wait (a user's signal handler that raises, a caught
    KeyboardInterrupt) leaves the call half-done - posted here, perhaps consumed by peers - so
    the group is marked unusable on every rank (stall.mark_broken): a later call on it would meet
    the abandoned one's round (review6: a peer could fold a stale chunk of a fused call, or hang)."""
    try:
        _wait(req, comm, op, kind)
    except CollectiveError:
        raise
    except BaseException as e:
        g = group_of(comm)
        gkey = op.gkey if op is not None and op.gkey else (f"{g.uid}:b" if g is not None else "")
        if op is not None:
            op.state = "abandoned"
        _abandoned.append(req)
        stall.mark_broken(gkey, f"{kind} interrupted by {type(e).__name__}")
        raise


def _wait(req, comm, op, kind: str) -> None:
    t0 = time.monotonic()
    seen, recheck = -1, 0.0
    g = None
    spins = 0
    delay = 0.0
    while not req.Test():
        spins += 1
        if spins & 31:  # look at notices every 32 tests: a notice is rare, a test is cheap
            continue
        now = time.monotonic()
        if stall.alarm != seen or (stall._peer_failed and now >= recheck) or stall._broken:
            seen, recheck = stall.alarm, now + 0.1
            if op is not None and op.gkey:
                why = stall.peers_problem(op.ranks, op.gkey, op.seq, sig=stall._sig_of(op.name, op.shape, op.dtype, op.site))
                gkey = op.gkey
            else:
                g = group_of(comm)
                gkey = f"{g.uid}:b" if g is not None else ""
                why = stall.peers_problem(g.ranks, gkey, None, t0) if g is not None else None
            if why:
                if op is not None:
                    op.state = "abandoned"  # the watchdog must not take this raise for a hang
                stall.consume_unknown(op.ranks if op is not None and op.gkey else (g.ranks if g is not None else ()))
                _abandoned.append(req)
                stall.mark_broken(gkey, f"{kind} abandoned: {why}")
                raise CollectiveError(f"{kind}: {why}")
        if spins > 200 and _oversubscribed():
            # More ranks than cores on this host: a late peer may need this core, so yield it -
            # in short sleeps (a long one would make this rank the late one when the peer comes).
            delay = min(1e-4, delay * 2 if delay else 1e-5)
            time.sleep(delay)


_over = None


def _oversubscribed() -> bool:
    """True when this host runs more ranks than it has cores (decided once)."""
    global _over
    if _over is None:
        _over = local_size() > (os.cpu_count() or 1)
    return _over


def describe(infos) -> str:
    """One message, identical on every rank, saying which ranks disagree and how."""
    errors = [(r, i[0]) for r, i in enumerate(infos) if i[0]]
    if errors:
        first = errors[0][1]
        ranks = [r for r, e in errors if e == first]
        more = f" (and {len(errors) - len(ranks)} other error(s) on other ranks)" if len(errors) > len(ranks) else ""
        return f"rank(s) {ranks}: {first}{more}"
    kinds = {i[1] for i in infos}
    sites = "; ".join(f"rank {r}: {i[1]} #{i[3]} at {i[4]}" for r, i in enumerate(infos))
    if len(kinds) > 1:
        return f"ranks called different collectives at the same point ({sites})"
    kind = infos[0][1]
    keys = sorted({key for i in infos for key in i[2]})
    parts = []
    for key in keys:
        vals = [i[2].get(key) for i in infos]
        if any(v != vals[0] for v in vals):
            groups: dict = {}
            for r, v in enumerate(vals):
                groups.setdefault(repr(v), []).append(r)
            parts.append(f"{key}: " + "; ".join(f"ranks {rs} passed {v}" for v, rs in groups.items()))
    if not parts and len({i[3] for i in infos}) > 1:
        return (f"{kind}: ranks are at different collective call numbers on this group - a rank skipped or "
                f"added a collective ({sites})")
    return f"{kind}: arguments differ across ranks - " + " | ".join(parts) + f" ({sites})"
