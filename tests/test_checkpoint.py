"""checkpoint.py robustness, in one process: non-regular files named like checkpoints, failed
writes, temporary-file names and their clean-up, directory fsyncs."""
import errno
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from disttrain import checkpoint

ARRAYS = {"param/w": np.arange(6.0).reshape(2, 3)}


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


def test_fifo_named_like_the_newest_checkpoint_is_skipped_not_opened(tmp_path):
    good = checkpoint.path_for(str(tmp_path), 5)
    checkpoint.save(good, ARRAYS, {"step": 5})
    fifo = checkpoint.path_for(str(tmp_path), 10)
    os.mkfifo(fifo)
    os.mkdir(checkpoint.path_for(str(tmp_path), 20))  # a directory is not a checkpoint either
    warned = []
    path, arrays, meta = _bounded(lambda: checkpoint.latest_valid(str(tmp_path), warn=warned.append))
    assert path == good and meta == {"step": 5} and np.array_equal(arrays["param/w"], ARRAYS["param/w"])
    assert any("ckpt-00000010.npz" in w and "not a regular file" in w for w in warned), warned
    assert any("ckpt-00000020.npz" in w for w in warned), warned
    assert checkpoint.latest(str(tmp_path)) == good


def test_load_of_a_fifo_refuses_instead_of_blocking(tmp_path):
    """The listing checks the type, but the file may be swapped between listing and open."""
    fifo = str(tmp_path / "ckpt-00000010.npz")
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        _bounded(lambda: checkpoint.load(fifo))


def _names(d):
    return sorted(os.listdir(d))


def test_failed_write_removes_its_temporary_file(tmp_path, monkeypatch):
    # a directory where the final file should go: the rename fails after the data was written
    final = checkpoint.path_for(str(tmp_path), 10)
    os.mkdir(final)
    with pytest.raises(OSError):
        checkpoint.save(final, ARRAYS, {"step": 10})
    assert _names(tmp_path) == ["ckpt-00000010.npz"], _names(tmp_path)

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)  # the write itself fails
    with pytest.raises(OSError, match="No space"):
        checkpoint.save(checkpoint.path_for(str(tmp_path), 20), ARRAYS, {"step": 20})
    assert _names(tmp_path) == ["ckpt-00000010.npz"], _names(tmp_path)


def test_temporary_names_carry_host_pid_and_a_random_part(tmp_path, monkeypatch):
    seen = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (seen.append(os.path.basename(a)), real(a, b)))
    for _ in range(2):
        checkpoint.save(checkpoint.path_for(str(tmp_path), 1), ARRAYS, {"step": 1})
    m = [checkpoint._TMP.fullmatch(n) for n in seen]
    assert all(m) and all(x["host"] == checkpoint._host() and int(x["pid"]) == os.getpid() for x in m), seen
    assert seen[0] != seen[1]  # same host, same pid, same step: still distinct


def test_stale_temporary_files_are_removed_by_host_and_age(tmp_path):
    here, d = checkpoint._host(), str(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that has exited
    live = str(os.getppid())
    files = {"same_dead": f"ckpt-00000010.npz.tmp-{here}-{dead}-0123abcd",
             "same_live": f"ckpt-00000010.npz.tmp-{here}-{live}-0123abcd",
             "other_young": "ckpt-00000010.npz.tmp-other-host-1-0123abcd",
             "other_old": "ckpt-00000010.npz.tmp-other-host-2-0123abcd",
             "legacy_old": "ckpt-00000010.npz.tmp-3",
             "unrelated": "notes.txt"}
    for n in files.values():
        open(os.path.join(d, n), "w").close()
    old = time.time() - 2 * checkpoint.STALE_TMP_SECONDS
    for k in ("other_old", "legacy_old"):
        os.utime(os.path.join(d, files[k]), (old, old))
    checkpoint._remove_stale_tmp(d)
    left = set(os.listdir(d))
    assert left == {files[k] for k in ("same_live", "other_young", "unrelated")}, left


def test_new_directories_and_the_renamed_entry_are_fsynced(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(checkpoint, "_fsync_dir", synced.append)
    target = tmp_path / "a" / "b"
    checkpoint.save(checkpoint.path_for(str(target), 3), ARRAYS, {"step": 3})
    # each created directory's parent (its entry), then the checkpoint's directory after the rename
    assert synced == [str(tmp_path), str(tmp_path / "a"), str(target)], synced
