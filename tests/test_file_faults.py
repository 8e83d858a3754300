"""Files under faults (issue 24, "files"): pack and sample never write over their inputs or over a folder another
process is writing, and a full disk, a read-only folder or a killed writer leaves nothing half-written behind,
with one line that names what to fix.

A full disk is a small tmpfs where this machine lets the tests mount one (root), else an injected
OSError(ENOSPC); a read-only folder is a read-only tmpfs, a folder without write permission (non-root), or an
injected OSError(EROFS).
"""

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from analytic_diffusion.cli import main
from analytic_diffusion.data import Dataset
from analytic_diffusion.data import cache as stats_cache
from analytic_diffusion.data import packed as packed_module
from analytic_diffusion.data.packed import load_packed, pack
from analytic_diffusion.files import FolderClaim
from analytic_diffusion.sampling import run as run_module

FAST = ["--n", "2", "--steps", "2", "--no-progress", "--method", "nearest"]


def _dataset(rng, n=200) -> Dataset:
    return Dataset(torch.randint(0, 256, (n, 1, 28, 28), generator=rng, dtype=torch.uint8), torch.arange(n) % 3)


def _npy_source(rng, folder: Path, n=200) -> str:
    path = folder / "src.npy"
    np.save(path, _dataset(rng, n).images.numpy())
    return str(path)


def _leftovers(folder: Path) -> list[str]:
    """Anything a writer leaves beside its output: staging folders, lock files."""
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or p.name.endswith(".lock"))


def _mount_tmpfs(path: Path, size: str, readonly: bool = False) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    opts = f"size={size}" + (",ro" if readonly else "")
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode == 0


@pytest.fixture
def full_disk(tmp_path):
    """(folder on a 64 KiB file system, mounted): when not mounted, the test injects ENOSPC itself."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mounted = _mount_tmpfs(folder, "64k")
    yield folder, mounted
    if mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def read_only(tmp_path):
    """(folder that cannot be written, how): a read-only tmpfs, or a folder without write permission."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if _mount_tmpfs(folder, "64k", readonly=True):
        yield folder, "mounted"
        subprocess.run(["umount", "-l", str(folder)], check=False)
        return
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder, "chmod"
        folder.chmod(0o755)
        return
    yield folder, "injected"


def _inject_read_only(monkeypatch) -> None:
    """Creating any file or folder fails as on a read-only file system (what the writers do first)."""

    def refuse(path, *a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    real_open = os.open
    monkeypatch.setattr(os, "mkdir", refuse)
    monkeypatch.setattr(os, "open", lambda p, flags, *a: refuse(p) if flags & os.O_CREAT else real_open(p, flags, *a))


def _no_data_loading(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the dataset was loaded before the output folder was checked")

    monkeypatch.setattr(run_module, "load_dataset", boom)
    monkeypatch.setattr("analytic_diffusion.data.load_dataset", boom)


def _one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------------------------------------ pack
def test_pack_never_writes_over_its_own_source(rng, tmp_path, capsys):
    """`pack P P` zeroed every image and re-checksummed the zeros; now it is refused, with or without --overwrite,
    and so is a folder that holds the source."""
    src = tmp_path / "P"
    header = pack(_dataset(rng), src)
    for argv in (["pack", str(src), str(src)], ["pack", str(src), str(src), "--overwrite"]):
        assert main(argv) == 2
        assert "error: out:" in _one_line(capsys.readouterr().err)
    assert main(["pack", str(src), str(tmp_path), "--overwrite"]) == 2  # the parent holds the source
    assert "error: out:" in _one_line(capsys.readouterr().err)
    again = load_packed(src)  # verifies every block against the checksums written by the first pack
    assert int(again.images.max()) > 0 and again.cache_params()["content"] == f"packed:{header['checksum']}"
    assert _leftovers(tmp_path) == []


def test_pack_into_a_file_or_a_foreign_folder_is_refused(rng, tmp_path, capsys):
    src = _npy_source(rng, tmp_path)
    f = tmp_path / "F"
    f.write_text("keep me")
    assert main(["pack", src, str(f)]) == 2
    assert "is an existing file" in _one_line(capsys.readouterr().err)
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me too")
    assert main(["pack", src, str(foreign), "--overwrite"]) == 2
    assert "holds files this command did not write (todo.txt)" in _one_line(capsys.readouterr().err)
    assert f.read_text() == "keep me" and (foreign / "todo.txt").read_text() == "keep me too"


def test_pack_overwrite_replaces_a_packed_folder_whole(rng, tmp_path):
    out = tmp_path / "P"
    pack(_dataset(rng, 50), out)
    src = _npy_source(rng, tmp_path, n=30)
    assert main(["pack", src, str(out), "--overwrite"]) == 0
    assert load_packed(out).n == 30 and _leftovers(tmp_path) == []


def test_pack_on_a_full_disk_leaves_nothing(rng, tmp_path, full_disk, monkeypatch, capsys):
    folder, mounted = full_disk
    src = _npy_source(rng, tmp_path, n=200)  # 157 KB of images for a 64 KiB disk
    if not mounted:

        def fill_up(path, write):  # a part of the file gets written, then the disk is full
            with open(path, "wb") as f:
                f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(packed_module, "_write_synced", fill_up)
    assert main(["pack", src, str(folder / "P")]) == 1
    err = _one_line(capsys.readouterr().err)
    assert "No space" in err and str(folder / "P") in err and "the disk is full" in err
    assert list(folder.iterdir()) == []  # no packed folder, no staging folder, no lock


def test_pack_into_a_read_only_folder(rng, tmp_path, read_only, monkeypatch, capsys):
    folder, how = read_only
    src = _npy_source(rng, tmp_path)
    if how == "injected":
        _inject_read_only(monkeypatch)
    rc = main(["pack", src, str(folder / "P")])
    err = _one_line(capsys.readouterr().err)
    assert rc == 1 and "choose a folder you can write to" in err, err
    assert list(folder.iterdir()) == []


def test_a_second_writer_of_one_folder_is_refused_before_any_work(rng, tmp_path, monkeypatch, capsys):
    """Two packs (or a pack and a sample) into one folder at once: the second one stops at once, naming the
    first one's pid; the first one's folder is then complete."""
    src = _npy_source(rng, tmp_path)
    out = tmp_path / "P"
    with FolderClaim(out) as first:
        _no_data_loading(monkeypatch)
        assert main(["pack", src, str(out)]) == 2
        assert f"another process (pid {os.getpid()}) is writing" in _one_line(capsys.readouterr().err)
        assert main(["sample", "--dataset", src, *FAST, "--out", str(out)]) == 2
        assert "is writing" in _one_line(capsys.readouterr().err)
        Path(first.stage, "done").write_text("first")
        first.commit()
    assert (out / "done").read_text() == "first" and _leftovers(tmp_path) == []


def test_a_killed_writer_blocks_nothing_and_its_debris_is_cleared(tmp_path):
    """A writer killed with SIGKILL leaves its staging folder and lock file; the kernel dropped its lock, so the
    next writer goes ahead and removes the debris."""
    out = tmp_path / "out"
    code = textwrap.dedent(
        f"""
        import time, pathlib
        from analytic_diffusion.files import FolderClaim
        c = FolderClaim({str(out)!r}).__enter__()
        pathlib.Path(c.stage, "half-written").write_text("x")
        print("claimed", flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "claimed"
        with pytest.raises(ValueError, match=f"pid {proc.pid}"):
            FolderClaim(out).__enter__()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(_leftovers(tmp_path)) == 2  # a staging folder and the lock file
    with FolderClaim(out) as claim:
        Path(claim.stage, "ok").write_text("y")
        claim.commit()
    assert os.listdir(out) == ["ok"] and _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------ sample
def test_sample_out_on_a_full_disk_leaves_nothing(tmp_path, full_disk, monkeypatch, capsys):
    folder, mounted = full_disk
    if mounted:  # fill the disk first, so the run's own files cannot fit
        (folder / "ballast").write_bytes(b"\0" * 60_000)
    else:
        monkeypatch.setattr(
            run_module.np, "savez_compressed", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space"))
        )
    assert main(["sample", "--subset", "40", *FAST, "--out", str(folder / "run")]) == 1
    err = _one_line(capsys.readouterr().err)
    assert "No space" in err and str(folder / "run") in err and "the disk is full" in err
    assert sorted(p.name for p in folder.iterdir()) == (["ballast"] if mounted else [])


def test_sample_out_on_a_read_only_folder_fails_before_any_work(tmp_path, read_only, monkeypatch, capsys):
    folder, how = read_only
    _no_data_loading(monkeypatch)
    if how == "injected":
        _inject_read_only(monkeypatch)
    assert main(["sample", *FAST, "--out", str(folder / "run")]) == 1
    assert "choose a folder you can write to" in _one_line(capsys.readouterr().err)


def test_sample_out_never_replaces_its_dataset(rng, tmp_path, capsys):
    src = tmp_path / "P"
    pack(_dataset(rng, 40), src)
    assert main(["sample", "--dataset", str(src), *FAST, "--out", str(src), "--overwrite"]) == 2
    assert "is, or holds, the input" in _one_line(capsys.readouterr().err)
    assert load_packed(src).n == 40


def test_finished_folders_follow_the_umask(tmp_path):
    with FolderClaim(tmp_path / "o") as claim:
        claim.commit()
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "o").stat().st_mode & 0o777 == 0o777 & ~umask


# ------------------------------------------------------------------------------------------------ statistics cache
def test_cache_on_a_full_disk_warns_and_goes_on(rng, full_disk, monkeypatch):
    folder, mounted = full_disk
    monkeypatch.setenv("AD_CACHE_DIR", str(folder))
    if mounted:
        (folder / "ballast").write_bytes(b"\0" * 62_000)
    else:
        monkeypatch.setattr(
            stats_cache.tempfile, "mkstemp", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space"))
        )
    ds = Dataset(torch.randint(0, 256, (30, 1, 16, 16), generator=rng, dtype=torch.uint8))
    with pytest.warns(UserWarning, match="statistics cache: cannot write .* going on without caching"):
        _, vals, _ = ds.pca()
    assert torch.allclose(vals, Dataset(ds.images).pca(cache=False)[1])
    assert [p.name for p in folder.iterdir()] == (["ballast"] if mounted else [])


def test_a_failed_run_leaves_no_folders_it_made(tmp_path, monkeypatch, capsys):
    """--out deep under folders that do not exist yet: a run that fails removes what it created for it."""
    monkeypatch.setattr(
        run_module.np, "savez_compressed", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space"))
    )
    assert main(["sample", "--subset", "40", *FAST, "--out", str(tmp_path / "runs" / "a" / "b")]) == 1
    assert "No space" in _one_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []
