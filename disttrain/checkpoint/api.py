"""One call to save and one to load a whole training state, resharding on load.

Both are collective over the group (default: the world - every rank that holds a part of the
model, whatever its dp/pp/tp role) and raise the same CheckpointError on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .. import log
from ..comm import validate
from ..groups import as_group
from . import manifest, reader, state, writer
from .manifest import CheckpointError, CorruptCheckpoint


@dataclass
class Loaded:
    """What :func:`load` found: the checkpoint's path, step, user metadata, manifest, and each
    writer rank's ``per_rank`` record (index = the rank that wrote it)."""

    path: str
    step: int
    extra: dict
    record: dict = field(repr=False)
    per_rank: list = field(default_factory=list, repr=False)


def _layout(g, ddp, lay) -> dict:
    out = {"world_size": g.size}
    if ddp is not None:
        out["dp"] = ddp.group.size
    return dict(out, **(lay or {}))


def _collect(g, model, optimizer, schedule, ddp, extra, layout) -> tuple[list, dict]:
    """(this rank's shards, the manifest fields) of the state to save."""
    model = model if model is not None or ddp is None else ddp.model
    shards = state.model_shards(model, ddp)
    lay = _layout(g, ddp, layout)
    rec = {"extra": extra or {}, "layout": lay}
    if optimizer is not None:
        shards += state.optimizer_shards(optimizer)[0]
        rec["optimizer"] = state.optimizer_record(optimizer, state.optimizer_buffers(optimizer))
    if schedule is not None:
        rec["schedule"] = schedule.state_dict()
    if ddp is not None:
        shards += state.compressor_shards(ddp.compressor.state_dict(), g.rank)
        rec["compressor"] = state.compressor_record(ddp.compressor, g.size, lay)
    return shards, rec


def _agree_step(g, step, what: str, strict=None) -> None:
    """Raise the same CheckpointError on every rank if the ranks name different steps: rank 0's
    step names the directory and picks the checkpoint, so a rank whose step counter drifted would
    otherwise have its state written under, or read from, another step than the one it asked for.
    `strict` (load) decides whether every rank takes part in the name check: agreed the same way.

    First the set-up check (validate.py): a rank that calls save or load alone - the habit of
    ``if rank == 0: save_checkpoint(...)`` - waited in the allgather below for good, untracked, so
    not even the stall inspector said where (attack9); now it meets its peers' next call on the
    group (every rank raises CollectiveError), or their departure (it raises, naming them)."""
    validate.check(g.comm, "load_checkpoint" if strict is not None else "save_checkpoint", {}, None, always=True)
    both = g.comm.allgather((step, strict))
    for i, kind in ((0, "steps"), (1, "strict= values")):
        if len({b[i] for b in both}) > 1:
            raise CheckpointError(f"{what}: the ranks name different {kind} (by rank: {[b[i] for b in both]})")


def save(directory: str, step: int, *, model=None, optimizer=None, schedule=None, ddp=None, extra=None,
         layout=None, per_rank=None, group=None) -> str:
    """:func:`save_checkpoint` plus `per_rank` (this rank's JSON record, kept per writer rank)."""
    g = as_group(group)
    _agree_step(g, step, f"a checkpoint in {directory} could not be written")
    shards, rec, err = [], {}, None
    try:  # a local mistake (no model, a layout that is not a view, ...) must raise on every rank
        shards, rec = _collect(g, model, optimizer, schedule, ddp, extra, layout)
    except (ValueError, TypeError, AttributeError) as e:
        err = CheckpointError(f"checkpoint {manifest.dir_for(directory, step)} could not be written: {e}")
    reader.agree(g.comm, err)
    # the buffer names every rank's optimizer has (a rank holding no parameter has none)
    everyone = g.comm.allgather(rec.get("optimizer", {}).get("buffers"))
    if "optimizer" in rec:
        rec["optimizer"]["buffers"] = sorted({b for bs in everyone if bs for b in bs})
    return writer.write(g.comm, directory, step, shards, rec, per_rank)


def save_checkpoint(directory: str, step: int, *, model=None, optimizer=None, schedule=None, ddp=None, extra=None,
                    layout=None, group=None) -> str:
    """Write checkpoint `step` of a training run into `directory` (collective).

    Every rank writes the parameters it holds (``ddp.parameter_shards()``, or the model's
    parameters through their layouts), the optimizer's buffers for them, and its compressor
    state, in parallel; rank 0 writes the manifest last and renames the whole directory into
    place (``directory/step-NNNNNNNN``). Replicated values are written once.

    Args:
        directory: the directory of checkpoints (created if missing).
        step: the step number (names the checkpoint; returned by load_checkpoint).
        model: the Module (this rank's part: a stage, tensor shards, ...); default ``ddp.model``.
        optimizer: an optim.Optimizer (also one from ``ddp.make_optimizer``).
        schedule: an optim.Schedule; its position is restored with the optimizer's lr.
        ddp: the DataParallel wrapper: its shards and compressor state are saved.
        extra: JSON-serialisable user metadata (rank 0's is kept).
        layout: JSON describing the parallel layout (mesh, sharding); compressor state is only
            restored under an identical layout and world size.
        group: the ranks taking part (default: the world).

    Returns:
        The checkpoint directory's path, on every rank.

    Example:
        >>> dt.save_checkpoint("ck", step, model=model, optimizer=opt, schedule=sched, ddp=ddp,
        ...                    extra={"epoch": epoch})
    """
    return save(directory, step, model=model, optimizer=optimizer, schedule=schedule, ddp=ddp, extra=extra,
                layout=layout, group=group)


def _one_of_rank0(g, fn):
    """fn() on rank 0, its result (or CheckpointError) on every rank."""
    res, err = None, None
    if g.rank == 0:
        try:
            res = fn()
        except CheckpointError as e:
            err = e
        except Exception as e:  # noqa: BLE001 - the other ranks wait in the broadcast: they must hear of it
            err = CheckpointError(f"{type(e).__name__}: {e}")
    out = g.comm.bcast((res, None if err is None else (isinstance(err, CorruptCheckpoint), str(err))), root=0)
    if out[1]:
        raise (CorruptCheckpoint if out[1][0] else CheckpointError)(out[1][1])
    return out[0]


def _where(g, directory: str, step, warn) -> list:
    """The checkpoints to try, newest first (rank 0 lists; everyone gets its list)."""
    def listing():
        if manifest.is_checkpoint(directory):
            return [directory]
        found = manifest.candidates(directory, warn)
        if step is not None:
            found = [p for p in found if p == manifest.dir_for(directory, step)]
        if not found:
            old = manifest.legacy_files(directory)
            why = (f"; it holds single-file checkpoints of an earlier disttrain ({', '.join(old[-2:])}), which "
                   "cannot be resumed: start the run again" if old else "")
            raise CheckpointError(f"no valid checkpoint{f' for step {step}' if step is not None else ''} in "
                                  f"{directory}{why}")
        return found
    return _one_of_rank0(g, listing)


def _unloaded(g, path, rec, names) -> CheckpointError | None:
    """strict=True: the checkpoint's parameters that no rank's model holds (collective: the union
    of every rank's names - a pipeline stage or a shard holds only some of them)."""
    every = g.comm.allgather(names)
    if any(n is None for n in every):
        return None  # a rank already failed: its error is the one reported
    held = set().union(*every)
    extra = sorted(k for k in rec["arrays"] if "/" not in k and k not in held)  # parameters, not state
    if extra:
        return CheckpointError(f"checkpoint {path} holds parameters the model lacks: {extra[:8]}"
                               f"{f' and {len(extra) - 8} more' if len(extra) > 8 else ''} (a different model? "
                               "strict=False loads the parameters the model has and ignores the rest)")
    return None


def _apply(g, path, rec, model, optimizer, schedule, ddp, layout, warn, strict) -> None:
    """Fill the live state from checkpoint `path` (manifest `rec`), or raise on every rank."""
    err, shards, new, comp, names = None, [], [], None, None
    try:
        model = model if model is not None or ddp is None else ddp.model
        shards = state.model_shards(model, ddp)
        names = sorted({s.name for s in shards})
        if optimizer is not None:
            orec = rec.get("optimizer")
            if orec is None:
                raise CheckpointError(f"checkpoint {path} holds no optimizer state")
            if orec["type"] != type(optimizer).__name__:
                raise CheckpointError(f"checkpoint {path} holds {orec['type']} state, the optimizer is "
                                      f"{type(optimizer).__name__}")
            more, new = state.optimizer_shards(optimizer, orec["buffers"])
            shards += more
        if schedule is not None and "schedule" not in rec:
            raise CheckpointError(f"checkpoint {path} holds no schedule state (it was saved without schedule=)")
        if ddp is not None:
            want = state.compressor_record(ddp.compressor, g.size, _layout(g, ddp, layout))
            saved = rec.get("compressor")
            if saved == want:
                comp = state.compressor_arrays(rec, g.rank)
                shards += state.compressor_shards(comp, g.rank)
            elif saved is not None and any(k.startswith(state.COMP) for k in rec["arrays"]):
                warn(f"[disttrain] warning: the checkpoint's compressor state ({saved['spec']!r}, "
                     f"{saved['world_size']} ranks, layout {saved['layout']}) does not fit this run "
                     f"({want['spec']!r}, {want['world_size']} ranks, layout {want['layout']}); error-feedback "
                     "residuals start from zero")
    except Exception as e:  # noqa: BLE001 - a manifest without a field, a model without layouts, ...: agreed
        err = e if isinstance(e, CheckpointError) else CheckpointError(f"checkpoint {path}: {type(e).__name__}: {e}")
    if strict:
        err = _unloaded(g, path, rec, names) if err is None else (_unloaded(g, path, rec, None) or err)
    reader.agree(g.comm, err)
    reader.fill(g.comm, path, rec, shards)
    if optimizer is not None:
        state.install(optimizer, rec["optimizer"], new)
    if schedule is not None:
        schedule.load_state_dict(rec["schedule"])
    if comp is not None:
        ddp.compressor.load_state_dict(comp)


def load(directory: str, *, model=None, optimizer=None, schedule=None, ddp=None, step=None, layout=None,
         group=None, check=None, warn=None, strict: bool = True) -> Loaded:
    """:func:`load_checkpoint`, returning everything found (a :class:`Loaded`). `check(path,
    record)` (called on every rank with the verified manifest) may raise ValueError to refuse a
    checkpoint before anything is read into the live state; `warn` gets the fallback and
    compressor warnings (default: disttrain's log, rank 0)."""
    g = as_group(group)
    _agree_step(g, step, f"cannot load from {directory}", bool(strict))
    warn = warn or log.logger.warning
    for path in _where(g, directory, step, warn):
        try:
            rec = _one_of_rank0(g, lambda: manifest.read(path))
            err = None
            if check is not None:
                try:
                    check(path, rec)
                except Exception as e:  # noqa: BLE001 - ValueError refuses; anything else must not strand a rank
                    err = e if isinstance(e, CheckpointError) else CheckpointError(
                        str(e) if isinstance(e, ValueError) else f"checkpoint {path}: {type(e).__name__}: {e}")
            reader.agree(g.comm, err)
            _apply(g, path, rec, model, optimizer, schedule, ddp, layout, warn, bool(strict))
        except CorruptCheckpoint as e:
            if path == directory:
                raise
            warn(f"[disttrain] skipping {e}")
            continue
        return Loaded(path, int(rec["step"]), rec.get("extra", {}), rec, rec.get("per_rank", []))
    raise CheckpointError(f"no valid checkpoint in {directory}")


def load_checkpoint(directory: str, *, model=None, optimizer=None, schedule=None, ddp=None, step=None, layout=None,
                    group=None, strict: bool = True) -> tuple[int, dict]:
    """Load a checkpoint into the live model, optimizer, schedule and DataParallel (collective),
    whatever the number of ranks and layout it was written under (resharding).

    Each rank fills exactly the regions it holds now from the saved regions that overlap them;
    every element must be covered and names, shapes and dtypes must agree, else every rank
    raises the same CheckpointError and nothing is changed. Compressor state is restored only
    under the same world size, layout and compressor (else dropped with a warning).

    Args:
        directory: a directory of checkpoints (the newest valid one is loaded; a damaged one is
            skipped with a warning) or one checkpoint directory (``.../step-00000100``).
        model, optimizer, schedule, ddp, layout, group: as for :func:`save_checkpoint`.
        step: load this step's checkpoint instead of the newest.
        strict: refuse (on every rank) a checkpoint holding parameters that no rank's model has -
            it belongs to another model. False: load what the model has, ignore the rest
            (e.g. a backbone's weights into a model without the checkpoint's head).

    Returns:
        (step, extra): the checkpoint's step and the user metadata saved with it.

    Example:
        >>> step, extra = dt.load_checkpoint("ck", model=model, optimizer=opt, schedule=sched, ddp=ddp)
    """
    got = load(directory, model=model, optimizer=optimizer, schedule=schedule, ddp=ddp, step=step, layout=layout,
               group=group, strict=strict)
    return got.step, got.extra
