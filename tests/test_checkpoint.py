"""Checkpoint robustness, in one process (a one-rank communicator): non-regular files named like
checkpoints or their manifests, failed writes, temporary names and their clean-up, directory
fsyncs - for the checkpoint directories (writer, reader) and the single-file format."""
import errno
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from disttrain.checkpoint import api, files, manifest, reader, single, writer
from disttrain.checkpoint.manifest import CheckpointError, CorruptCheckpoint
from disttrain.nn.layout import Shard, whole

ARRAYS = {"param/w": np.arange(6.0).reshape(2, 3)}


class SelfComm:
    """The collectives the writer and reader use, on one rank."""

    rank, size = 0, 1

    def allgather(self, x):
        return [x]

    def gather(self, x, root=0):
        return [x]

    def bcast(self, x, root=0):
        return x


def _shard(a, name="w"):
    return Shard(name, a.shape, whole(a.shape), None, a)


def _write(d, step, a=None):
    a = np.arange(6.0).reshape(2, 3) + step if a is None else a
    return writer.write(SelfComm(), str(d), step, [_shard(a)], {"extra": {}})


def _read(path, shape=(2, 3)):
    out = np.zeros(shape)
    reader.fill(SelfComm(), path, manifest.read(path), [_shard(out)])
    return out


def _bounded(fn, seconds=10):
    """Run fn in a thread; fail (instead of hanging the suite) if it does not return in time."""
    out = {}

    def body():
        try:
            out["r"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test's thread
            out["e"] = e

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn} blocked for {seconds} s"
    if "e" in out:
        raise out["e"]
    return out["r"]


def test_fifo_or_file_named_like_the_newest_checkpoint_is_skipped_not_opened(tmp_path):
    good = _write(tmp_path, 5)
    os.mkfifo(manifest.dir_for(str(tmp_path), 10))
    open(manifest.dir_for(str(tmp_path), 20), "w").close()  # a file is not a checkpoint either
    warned = []
    found = _bounded(lambda: manifest.candidates(str(tmp_path), warn=warned.append))
    assert found == [good], found
    assert any("step-00000010" in w and "not a directory" in w for w in warned), warned
    assert any("step-00000020" in w for w in warned), warned
    np.testing.assert_array_equal(_read(good), np.arange(6.0).reshape(2, 3) + 5)


def test_fifo_as_manifest_or_shard_file_refuses_instead_of_blocking(tmp_path):
    """The listing checks the type, but files may be swapped in after it."""
    path = _write(tmp_path, 1)
    rec = manifest.read(path)
    shard = os.path.join(path, manifest.shard_file(0))
    os.remove(shard)
    os.mkfifo(shard)
    with pytest.raises(CorruptCheckpoint, match="not a regular file"):
        _bounded(lambda: reader.fill(SelfComm(), path, rec, [_shard(np.zeros((2, 3)))]))
    os.remove(os.path.join(path, manifest.MANIFEST))
    os.mkfifo(os.path.join(path, manifest.MANIFEST))
    with pytest.raises(CorruptCheckpoint, match="not a regular file"):
        _bounded(lambda: manifest.read(path))


def test_load_of_a_fifo_refuses_instead_of_blocking(tmp_path):
    fifo = str(tmp_path / "one.npz")
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        _bounded(lambda: single.load(fifo))


def test_every_damaged_byte_of_a_checkpoint_is_refused_or_harmless(tmp_path):
    """Flip each byte of the manifest and of the shard file: a load refuses (CorruptCheckpoint,
    or CheckpointError for a manifest whose checksum happens to hold), or returns the right data."""
    path = _write(tmp_path, 3)
    want = _read(path)
    for name in (manifest.MANIFEST, manifest.shard_file(0)):
        f = os.path.join(path, name)
        good = open(f, "rb").read()
        refused = 0
        for pos in range(len(good)):
            raw = bytearray(good)
            raw[pos] ^= 0xFF
            open(f, "wb").write(bytes(raw))
            try:
                got = _read(path)
            except CheckpointError:
                refused += 1
                continue
            np.testing.assert_array_equal(got, want)  # never silently different data
        open(f, "wb").write(good)
        assert refused > 0.9 * len(good), (name, refused, len(good))


def _names(d):
    return sorted(os.listdir(d))


def test_failed_write_removes_its_temporary_directory_on_every_path(tmp_path, monkeypatch):
    open(manifest.dir_for(str(tmp_path), 10), "w").close()  # a file in the way: the rename fails
    with pytest.raises(CheckpointError, match="could not be written"):
        _write(tmp_path, 10)
    assert _names(tmp_path) == ["step-00000010"], _names(tmp_path)

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "write_durable", full_disk)  # the shard (and manifest) writes fail
    with pytest.raises(CheckpointError, match="No space"):
        _write(tmp_path, 20)
    assert _names(tmp_path) == ["step-00000010"], _names(tmp_path)


def test_metadata_json_cannot_encode_is_an_error_not_a_stranded_rank(tmp_path):
    with pytest.raises(CheckpointError, match="could not be written: TypeError"):
        writer.write(SelfComm(), str(tmp_path), 1, [_shard(np.zeros(3))], {"extra": {"x": object()}})
    assert _names(tmp_path) == [], _names(tmp_path)


def test_the_same_step_written_again_replaces_the_checkpoint(tmp_path):
    _write(tmp_path, 4)
    path = _write(tmp_path, 4, np.full((2, 3), 7.0))
    np.testing.assert_array_equal(_read(path), np.full((2, 3), 7.0))
    assert _names(tmp_path) == ["step-00000004"], _names(tmp_path)
    os.mkdir(manifest.dir_for(str(tmp_path), 5))  # a directory that is not a checkpoint is never replaced
    open(os.path.join(manifest.dir_for(str(tmp_path), 5), "notes.txt"), "w").close()
    with pytest.raises(CheckpointError):
        _write(tmp_path, 5)
    assert os.listdir(manifest.dir_for(str(tmp_path), 5)) == ["notes.txt"]


def test_single_file_failed_write_removes_its_temporary_file(tmp_path, monkeypatch):
    # a directory where the final file should go: the rename fails after the data was written
    final = str(tmp_path / "one.npz")
    os.mkdir(final)
    with pytest.raises(OSError):
        single.save(final, ARRAYS, {"step": 10})
    assert _names(tmp_path) == ["one.npz"], _names(tmp_path)

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)  # the write itself fails
    with pytest.raises(OSError, match="No space"):
        single.save(str(tmp_path / "two.npz"), ARRAYS, {"step": 20})
    assert _names(tmp_path) == ["one.npz"], _names(tmp_path)


def test_temporary_names_carry_host_pid_and_a_random_part(tmp_path, monkeypatch):
    seen = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (seen.append(os.path.basename(a)), real(a, b)))
    for _ in range(2):
        single.save(str(tmp_path / "one.npz"), ARRAYS, {"step": 1})
    m = [single._TMP.fullmatch(n) for n in seen]
    assert all(m) and all(x["host"] == files.host() and int(x["pid"]) == os.getpid() for x in m), seen
    assert seen[0] != seen[1]  # same host, same pid, same step: still distinct
    renamed = []
    monkeypatch.setattr(os, "rename", lambda a, b: (renamed.extend(map(os.path.basename, (a, b))), real(a, b)))
    for _ in range(2):
        _write(tmp_path / "d", 1)  # the second moves the first aside (.old-...) before its rename
    renamed = sorted(set(renamed) - {"step-00000001"})
    m = [manifest.TMP.fullmatch(n) for n in renamed]
    assert all(m) and all(x["host"] == files.host() and int(x["pid"]) == os.getpid() for x in m), renamed
    assert len(set(renamed)) == 3 and sum(".old-" in n for n in renamed) == 1, renamed


@pytest.mark.parametrize("kind", ["single", "directory"])
def test_stale_temporaries_are_removed_by_host_and_age(tmp_path, kind):
    here, d = files.host(), str(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that has exited
    live = str(os.getppid())
    names = {"same_dead": f"ckpt-00000010.npz.tmp-{here}-{dead}-0123abcd",
             "same_live": f"ckpt-00000010.npz.tmp-{here}-{live}-0123abcd",
             "other_young": "ckpt-00000010.npz.tmp-other-host-1-0123abcd",
             "other_old": "ckpt-00000010.npz.tmp-other-host-2-0123abcd",
             "legacy_old": "ckpt-00000010.npz.tmp-3",
             "unrelated": "notes.txt"}
    if kind == "directory":  # writers' directories and checkpoints moved aside
        names = {k: v.replace("ckpt-00000010.npz.tmp", "step-00000010.tmp") for k, v in names.items()}
        names["legacy_old"] = names["other_old"].replace(".tmp-other-host-2", ".old-other-host-3")
    for n in names.values():
        if kind == "directory" and n != "notes.txt":
            os.mkdir(os.path.join(d, n))
            open(os.path.join(d, n, manifest.shard_file(0)), "w").close()
        else:
            open(os.path.join(d, n), "w").close()
    old = time.time() - 2 * files.STALE_TMP_SECONDS
    for k in ("other_old", "legacy_old"):
        os.utime(os.path.join(d, names[k]), (old, old))
    if kind == "single":
        single._remove_stale_tmp(d)
    else:
        files.remove_stale(d, manifest.TMP)
    left = set(os.listdir(d))
    assert left == {names[k] for k in ("same_live", "other_young", "unrelated")}, left


def test_new_directories_and_the_renamed_entry_are_fsynced(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(files, "fsync_dir", synced.append)
    target = tmp_path / "a" / "b"
    single.save(str(target / "one.npz"), ARRAYS, {"step": 3})
    # each created directory's parent (its entry), then the file's directory after the rename
    assert synced == [str(tmp_path), str(tmp_path / "a"), str(target)], synced
    synced.clear()
    target = tmp_path / "c"
    path = _write(target, 3)
    tmp = [p for p in synced if ".tmp-" in p]
    # the new directory's parent; the written checkpoint (manifest last) before its rename; the parent after
    assert synced == [str(tmp_path), tmp[0], str(target)] and len(tmp) == 1, synced
    assert os.path.isdir(path)


def test_single_file_checkpoints_of_earlier_versions_are_refused_with_a_message(tmp_path):
    class Group:
        rank, size, comm = 0, 1, SelfComm()

    single.save(str(tmp_path / "ckpt-00000010.npz"), ARRAYS, {"step": 10})
    with pytest.raises(CheckpointError, match=r"single-file checkpoints of an earlier disttrain \(ckpt-00000010.npz\)"):
        api._where(Group(), str(tmp_path), None, print)
    path = _write(tmp_path, 12)
    assert api._where(Group(), str(tmp_path), None, print) == [path]


def test_a_relative_checkpoint_directory_that_does_not_exist_yet_is_created(tmp_path, monkeypatch):
    """--checkpoint-dir ck (relative, new): its parent is the working directory, not '' - the first
    checkpoint of such a run used to fail with FileNotFoundError on every rank."""
    monkeypatch.chdir(tmp_path)
    path = _write("ck/sub", 3)
    np.testing.assert_array_equal(_read(path), np.arange(6.0).reshape(2, 3) + 3)


def test_a_crash_between_the_renames_of_a_rewritten_step_keeps_that_step(tmp_path, monkeypatch):
    """The same step written again (end of run) moves the old directory aside, then renames the new
    one in; a crash in between left the step only as .old-/.tmp- directories that no reader
    trusted and that the next save deleted. Now the moved-aside checkpoint stands in for the step
    (readers list it) and the next writer renames it back."""
    _write(tmp_path, 1)
    _write(tmp_path, 2)
    real = os.rename

    def crash_on_second(src, dst):
        if ".tmp-" in src and dst.endswith("step-00000002"):
            raise KeyboardInterrupt("killed between the renames")
        return real(src, dst)

    monkeypatch.setattr(writer.os, "rename", crash_on_second)
    with pytest.raises(BaseException):
        _write(tmp_path, 2, np.full((2, 3), 9.0))
    monkeypatch.setattr(writer.os, "rename", real)
    assert "step-00000002" not in _names(tmp_path)
    newest = manifest.candidates(str(tmp_path))[0]
    assert ".old-" in newest
    np.testing.assert_array_equal(_read(newest), np.arange(6.0).reshape(2, 3) + 2)  # the step-2 values
    monkeypatch.setattr(files, "writer_dead", lambda m, full, now: True)  # as after the crashed writer's exit
    _write(tmp_path, 3)
    assert {"step-00000001", "step-00000002", "step-00000003"} <= set(_names(tmp_path))
    np.testing.assert_array_equal(_read(str(tmp_path / "step-00000002")), np.arange(6.0).reshape(2, 3) + 2)
