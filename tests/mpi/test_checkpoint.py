"""Resharding checkpoints through the public API: state saved under one layout (every rank whole,
row blocks, column blocks, ZeRO-style flat ranges, ranges of blocks, at any rank count) loads
under every other one - and on fewer ranks - to exactly the global arrays it came from; optimizer
state of every optimizer and the schedule come back; a damaged or missing file on one rank, a
model that does not fit, or an uncovered element raise the same error on every rank and change
nothing; the command line inspects, verifies and converts."""
import os
import shutil
import subprocess
import sys
import tempfile
import zlib

import numpy as np
import pytest

import disttrain as dt
from disttrain import checkpoint, optim
from disttrain.checkpoint import CheckpointError, CorruptCheckpoint
from disttrain.checkpoint.__main__ import main as cli
from disttrain.nn.layout import Piece, shards, whole
from disttrain.nn.module import Parameter

#: The rank counts tests/test_mpi_suites.py runs this file at (the rule there: 1, 2, 3 and 5 always; 4 and
# 8 where they reach a case of their own). Here the pieces of each scheme depend on p only through
# np.array_split's bounds: 5 already gives uneven splits and fewer rows (and columns) than ranks for every
# array of SHAPES, the loads on fewer ranks go 5 -> 2 and 3 -> 1; 4 and 8 reach no other case (the
# library's collectives run at every count in the files that test them).
MPI_RANKS = (1, 2, 3, 5)

# uneven sizes, fewer rows than ranks, a 0-d array, an empty array
SHAPES = {"a.w": (7, 5), "a.b": (3,), "c.e": (2, 9), "c.s": (), "c.z": (0, 4)}
SCHEMES = ["whole", "rows", "cols", "flat", "flat_of_rows"]


def _split(n, r, p):
    b = np.linspace(0, n, p + 1).astype(int)  # np.array_split's bounds: some empty when n < p
    return int(b[r]), int(b[r + 1])


def _pieces(shape, scheme, r, p):
    """The pieces of global array `shape` that rank r of p holds under `scheme` (maybe none)."""
    box = whole(shape)
    n = int(np.prod(shape, dtype=np.int64))
    if n == 0:  # an empty array: rank 0 holds it (a zero-size piece cannot be a view)
        return [Piece(None, shape, box)] if r == 0 or scheme == "whole" else []
    if scheme == "whole" or not shape:
        return [Piece(None, shape, box)] if scheme in ("whole", "rows", "cols") or r == 0 else []
    if scheme in ("rows", "cols"):
        ax = 0 if scheme == "rows" else len(shape) - 1
        a, b = _split(shape[ax], r, p)
        box = tuple((a, b) if i == ax else se for i, se in enumerate(box))
        return [Piece(None, shape, box)] if b > a else []
    if scheme == "flat":
        a, b = _split(n, r, p)
        return [Piece(None, shape, box, flat=(a, b))] if b > a else []
    # flat_of_rows: two halves of rank r's row block (a range within a box), held by one rank
    a, b = _split(shape[0], r, p)
    if b <= a:
        return []
    rbox = ((a, b),) + box[1:]
    m = (b - a) * int(np.prod(shape[1:], dtype=np.int64))
    return [Piece(None, shape, rbox, flat=f) for f in ((0, m // 2), (m // 2, m)) if f[1] > f[0]]


class Holder:
    """A model of loose Parameters: what a real model's layers would hold under the scheme."""

    def __init__(self, scheme, group, dtype=np.float64):
        r, p = group.rank, group.size
        self.params = []
        for name, shape in SHAPES.items():
            for i, pc in enumerate(_pieces(shape, scheme, r, p)):
                data = np.zeros(pc.size if pc.flat else [e - s for s, e in pc.box] if shape else (), dtype)
                q = Parameter(data, name=name, layout=[pc])
                self.params.append(q)

    def parameters(self):
        return self.params


def _ref(name, shape, salt=0):
    return np.random.default_rng([zlib.crc32(name.encode()), salt]).standard_normal(shape)


def _salt(buffer: str) -> int:
    return 1 + zlib.crc32(buffer.encode()) % 1000


def _set(shard, salt):
    full = _ref(shard.name.rsplit("/", 1)[-1], shard.shape, salt).reshape(shard.shape)
    part = full[tuple(slice(a, b) for a, b in shard.box)]
    shard.data[...] = part.reshape(-1)[shard.flat[0]:shard.flat[1]] if shard.flat else part


def _check(shard, salt):
    want = np.empty_like(shard.data)
    _set(type(shard)(shard.name, shard.shape, shard.box, shard.flat, want), salt)
    np.testing.assert_array_equal(shard.data, want, err_msg=shard.name)


@pytest.fixture(scope="module")
def where(comm):
    d = comm.bcast(tempfile.mkdtemp(prefix="ckpt-test-") if comm.rank == 0 else None)
    yield d
    comm.Barrier()
    if comm.rank == 0:
        shutil.rmtree(d, ignore_errors=True)


def _model(scheme, group, opt_cls=optim.SGD):
    """A holder with reference values and an optimizer whose every buffer holds reference values."""
    h = Holder(scheme, group)
    params = _unique(h)
    opt = opt_cls(params, lr=0.5, **({"momentum": 0.9} if opt_cls is optim.SGD else {}))
    for q in params:
        q.grad[...] = 0.1
    opt.step()  # creates every buffer the optimizer has
    for q in params:
        for s in shards(q):
            _set(s, 0)
        for b, a in opt.state[q.name].items():
            for s in shards(q, a, prefix=f"optimizer/{b}/"):
                _set(s, _salt(b))
    opt.steps, opt.lr = 7, 0.25
    return h, opt


def _unique(h):
    """Optimizers key state by name: a rank holding two pieces of one array gets one parameter per
    piece, renamed apart (their layout still names the global array)."""
    seen = {}
    for q in h.params:
        k = seen.get(q.name, 0)
        seen[q.name] = k + 1
        if k:
            q.name = f"{q.name}#{k}"
            q.layout = [Piece(q.name.split("#")[0].rsplit(".", 1)[1], *_fields(q.layout[0]))]
    return h.params


def _fields(pc):
    return pc.shape, pc.box, pc.flat, pc.rows


def _verify(h, opt):
    for q in h.params:
        for s in shards(q):
            _check(s, 0)
        for b, a in opt.state[q.name].items():
            for s in shards(q, a, prefix=f"optimizer/{b}/"):
                _check(s, _salt(b))
    assert opt.steps == 7 and opt.lr == 0.25


@pytest.fixture(scope="module")
def saved(comm, where):
    """One checkpoint per scheme, written by every rank."""
    out = {}
    for scheme in SCHEMES:
        h, opt = _model(scheme, dt.world())
        sched = optim.WarmupCosine(opt, total_steps=50, warmup_steps=5)
        sched.t = 11
        opt.lr = 0.25
        out[scheme] = dt.save_checkpoint(os.path.join(where, scheme), 3, model=h, optimizer=opt, schedule=sched,
                                         extra={"scheme": scheme})
    return out


@pytest.mark.parametrize("src", SCHEMES)
def test_every_layout_loads_into_every_other(comm, saved, src):
    for dst in SCHEMES:
        h = Holder(dst, dt.world())
        opt = optim.SGD(_unique(h), lr=1.0, momentum=0.9)
        step, extra = dt.load_checkpoint(os.path.dirname(saved[src]), model=h, optimizer=opt)
        assert (step, extra) == (3, {"scheme": src})
        _verify(h, opt)


def test_fewer_ranks_load_what_all_ranks_wrote(comm, saved):
    """The first half of the ranks (a group) loads every checkpoint under another scheme."""
    n = max(1, comm.size // 2)
    g = dt.new_group(list(range(n)))
    if comm.rank < n:
        for src, dst in zip(SCHEMES, SCHEMES[1:] + SCHEMES[:1]):
            h = Holder(dst, g)
            opt = optim.SGD(_unique(h), lr=1.0, momentum=0.9)
            sched = optim.WarmupCosine(opt, total_steps=50, warmup_steps=5)
            dt.load_checkpoint(saved[src], model=h, optimizer=opt, schedule=sched, group=g)
            assert sched.t == 11
            opt.lr = 0.25  # the schedule set lr for step 11; the optimizer record holds the saved one
            _verify(h, opt)
    comm.Barrier()
    g.free()


@pytest.mark.parametrize("opt_cls", [optim.SGD, optim.Adam, optim.AdamW, optim.LAMB])
def test_every_optimizer_buffer_reshards(comm, where, opt_cls):
    h, opt = _model("rows", dt.world(), opt_cls)
    d = os.path.join(where, f"opt-{opt_cls.__name__}")
    dt.save_checkpoint(d, 1, model=h, optimizer=opt)
    h2 = Holder("flat", dt.world())
    opt2 = opt_cls(_unique(h2), lr=1.0)
    dt.load_checkpoint(d, model=h2, optimizer=opt2)
    want = ["momentum"] if opt_cls is optim.SGD else ["m", "v"]
    assert all(sorted(opt2.state[q.name]) == want for q in h2.params)
    _verify(h2, opt2)
    with pytest.raises(CheckpointError, match="holds no schedule state"):
        dt.load_checkpoint(d, model=h2, optimizer=opt2, schedule=optim.WarmupCosine(opt2, total_steps=5))
    with pytest.raises(CheckpointError, match="holds .* state, the optimizer is"):
        dt.load_checkpoint(d, model=h2, optimizer=(optim.SGD if opt_cls is not optim.SGD else optim.Adam)(
            h2.params or [Parameter(np.zeros(1), "x")], lr=1.0))


def test_state_not_shaped_like_its_parameter_is_refused_not_written_wrong(comm, where):
    """RowWiseAdagrad keeps one value per row: without a layout for it, saving must refuse."""
    h, _ = _model("rows", dt.world())
    opt = optim.RowWiseAdagrad(h.params, lr=0.1)
    for q in h.params:
        q.grad[...] = 0.1
    opt.step()
    msg = _same_error_everywhere(comm, lambda: dt.save_checkpoint(os.path.join(where, "rowwise"), 1, model=h,
                                                                  optimizer=opt), CheckpointError)
    assert "only parameter-shaped optimizer buffers" in msg and "row_sum" in msg, msg


def _same_error_everywhere(comm, fn, cls):
    with pytest.raises(cls) as e:
        fn()
    msgs = comm.allgather(str(e.value))
    assert len(set(msgs)) == 1, msgs
    return msgs[0]


def test_damaged_or_missing_file_on_one_rank_raises_everywhere_and_falls_back(comm, where):
    d = os.path.join(where, "damaged")
    for step in (1, 2):
        h, opt = _model("rows", dt.world())
        dt.save_checkpoint(d, step, model=h, optimizer=opt)
    newest = os.path.join(d, "step-00000002")
    rec = checkpoint.manifest.read(newest)
    victim = sorted(rec["files"])[-1]
    first = min(e["offset"] for e in rec["entries"] if e["file"] == victim and np.prod(e["shape"]) > 0)
    for damage in ("flip", "remove", "truncate"):
        comm.Barrier()
        if comm.rank == 0:
            shutil.copy(os.path.join(newest, victim), os.path.join(where, "good.bin"))
            path = os.path.join(newest, victim)
            if damage == "flip":
                b = bytearray(open(path, "rb").read())
                b[first] ^= 0xFF  # inside an entry (padding between entries is not data)
                open(path, "wb").write(bytes(b))
            elif damage == "remove":
                os.remove(path)
            else:
                os.truncate(path, os.path.getsize(path) - 1)
        comm.Barrier()
        # columns: every rank reads every row block; rows: (mostly) only the rank whose rows are damaged
        for scheme in ("cols", "rows"):
            h = Holder(scheme, dt.world())
            opt = optim.SGD(_unique(h), lr=1.0, momentum=0.9)  # every entry is read by some rank
            before = [q.data.copy() for q in h.params]
            msg = _same_error_everywhere(comm, lambda: dt.load_checkpoint(newest, model=h, optimizer=opt),
                                         CorruptCheckpoint)
            assert victim in msg, msg
            assert all(np.array_equal(a, q.data) for a, q in zip(before, h.params))  # nothing changed
        warned = []
        got = checkpoint.load(d, model=h, optimizer=opt, warn=warned.append)  # the directory: the previous one is used
        assert got.step == 1 and any("skipping" in w and victim in w for w in warned), warned
        comm.Barrier()
        if comm.rank == 0:
            shutil.copy(os.path.join(where, "good.bin"), os.path.join(newest, victim))


def test_a_model_that_does_not_fit_raises_everywhere(comm, saved):
    class Other(Holder):
        pass

    h = Other("rows", dt.world())
    if dt.rank() == comm.size - 1:  # one rank's model differs: a bigger array
        h.params.append(Parameter(np.zeros((8, 5)), name="a.w", layout=[Piece(None, (8, 5), whole((8, 5)))]))
    msg = _same_error_everywhere(comm, lambda: dt.load_checkpoint(saved["rows"], model=h), CheckpointError)
    assert "'a.w' is float64(7, 5) in the checkpoint but float64(8, 5) here" in msg, msg
    h = Holder("rows", dt.world())
    if dt.rank() == 0:
        h.params.append(Parameter(np.zeros(2), name="nope"))
    msg = _same_error_everywhere(comm, lambda: dt.load_checkpoint(saved["rows"], model=h), CheckpointError)
    assert "has no array 'nope'" in msg


def test_uncovered_elements_are_an_error(comm, where):
    """A checkpoint of only some rows of an array cannot fill the whole array."""
    d = os.path.join(where, "partial")
    mine = [Parameter(np.ones((1, 5)), name="a.w", layout=[Piece(None, (7, 5), ((6, 7), (0, 5)))])]
    dt.save_checkpoint(d, 1, model=mine)
    h = [Parameter(np.zeros((7, 5)), name="a.w")]
    msg = _same_error_everywhere(comm, lambda: dt.load_checkpoint(d, model=h), CheckpointError)
    assert "30 element(s) of 'a.w'" in msg and "in no saved shard" in msg, msg


def test_command_line_inspect_verify_convert(comm, saved, where, capsys):
    if comm.rank == 0:
        path = saved["flat_of_rows"]
        assert cli(["inspect", os.path.dirname(path)]) == 0
        out = capsys.readouterr().out
        assert "step 3" in out and f"written by {comm.size} ranks" in out and "a.w" in out, out
        assert "optimizer SGD: step count 7" in out and "[0:" in out, out
        assert cli(["verify", path]) == 0
        target = os.path.join(where, "one.npz")
        assert cli(["convert", path, "--to", "single", target]) == 0
        arrays, meta = checkpoint.single.load(target)
        for name, shape in SHAPES.items():
            np.testing.assert_array_equal(arrays[name], _ref(name, shape, 0).reshape(shape))
            np.testing.assert_array_equal(arrays[f"optimizer/momentum/{name}"], _ref(name, shape, _salt("momentum")).reshape(shape))
        assert meta["step"] == 3 and meta["extra"] == {"scheme": "flat_of_rows"}
        res = subprocess.run([sys.executable, "-m", "disttrain.checkpoint", "inspect", "--json", path],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and '"world_size"' in res.stdout, res.stderr
        bad = os.path.join(where, "bad-copy")
        shutil.copytree(path, bad)
        f = sorted(x for x in os.listdir(bad) if x.endswith(".bin"))[0]
        with open(os.path.join(bad, f), "r+b") as fh:
            fh.seek(0)
            first = fh.read(1)
            fh.seek(0)
            fh.write(bytes([first[0] ^ 1]))
        assert cli(["verify", bad]) == 1
        assert "failed its checksum" in capsys.readouterr().err
    comm.Barrier()


@pytest.mark.mpi
def test_ranks_that_name_different_steps_raise_everywhere(comm, where):
    """Rank 0's step names the directory written and picks the one read: a rank whose step
    counter drifted had its state saved under rank 0's step, or loaded another step than it asked
    for, silently. Every rank now raises the same error and nothing is written."""
    if comm.Get_size() == 1:
        pytest.skip("one rank cannot disagree with itself")
    d = os.path.join(where, "steps")
    params = [Parameter(np.arange(6.0), name="w")]
    last = comm.Get_size() - 1
    with pytest.raises(CheckpointError, match=r"different steps \(by rank: \[3, "):
        dt.save_checkpoint(d, 3 if comm.Get_rank() != last else 4, model=params)
    assert not any(os.path.isdir(os.path.join(d, f"step-0000000{n}")) for n in (3, 4))  # nothing written
    dt.save_checkpoint(d, 5, model=params)
    dt.save_checkpoint(d, 6, model=params)
    with pytest.raises(CheckpointError, match="different steps"):
        dt.load_checkpoint(d, model=params, step=6 if comm.Get_rank() != last else 5)
    assert dt.load_checkpoint(d, model=params, step=5)[0] == 5
    comm.Barrier()


@pytest.mark.mpi(min_size=2)
def test_a_rank_that_skips_save_or_load_makes_every_rank_raise(comm, where):
    """attack9: a save or load called by some ranks only (the habit ``if rank == 0: save(...)``)
    left them in the checkpoint's first allgather for good - untracked, so no stall report either -
    while the others went on. Now it meets the others' next call: CollectiveError on every rank."""
    d = os.path.join(where, "skip")
    params = [Parameter(np.arange(6.0), name="w")]
    last = comm.Get_size() - 1
    for call in ("save", "load"):
        if call == "load":  # the load needs a checkpoint: every rank saves it
            dt.save_checkpoint(d, 1, model=params)
        with pytest.raises(dt.CollectiveError, match="different collectives") as e:
            if comm.Get_rank() != last:
                dt.save_checkpoint(d, 2, model=params) if call == "save" else dt.load_checkpoint(d, model=params)
            dt.allreduce(np.ones(3))
        assert len(set(comm.allgather(str(e.value)))) == 1
    assert dt.load_checkpoint(d, model=params)[0] == 1  # the group is still usable, nothing was written
    comm.Barrier()


def test_a_checkpoint_of_a_larger_model_is_refused_unless_strict_false(comm, where):
    """strict (the default) compares the checkpoint's parameters with the union of every rank's:
    here the new model lacks "c.e" on every rank; strict=False loads the rest; ranks passing
    different strict= values raise the same error instead of splitting into two protocols."""
    h, _ = _model("rows", dt.world())
    d = os.path.join(where, "strict")
    dt.save_checkpoint(d, 1, model=h)
    small = Holder("cols", dt.world())
    small.params = [q for q in small.params if q.name != "c.e"]
    before = [q.data.copy() for q in small.params]
    msg = _same_error_everywhere(comm, lambda: dt.load_checkpoint(d, model=small), CheckpointError)
    assert "holds parameters the model lacks: ['c.e']" in msg, msg
    assert all(np.array_equal(a, q.data) for a, q in zip(before, small.params))  # nothing changed
    dt.load_checkpoint(d, model=small, strict=False)
    for q in small.params:
        for s in shards(q):
            _check(s, 0)
    if comm.size > 1:
        msg = _same_error_everywhere(comm, lambda: dt.load_checkpoint(d, model=small, strict=comm.rank == 0),
                                     CheckpointError)
        assert "different strict= values" in msg, msg
