"""Output folders written safely: claimed before any work, filled under a staging name, renamed into place at the end.

A :class:`FolderClaim` on ``out`` (docs/design.md §14.2):

* takes an exclusive lock on the sibling file ``.NAME.lock`` (``flock``: the kernel drops it when its process
  ends, even by SIGKILL, so a crashed run never blocks the next one), so two processes can never write one
  folder at once: the second is refused before it does any work;
* checks, holding the lock, what ``out`` is: a file, or a non-empty folder without ``overwrite``, is refused;
* removes staging folders of ``out`` that earlier runs left behind when they were killed (holding the lock,
  nothing else can be writing them);
* hands out a fresh staging folder ``.NAME.partial-XXXX`` beside ``out`` on the same file system;
* :meth:`FolderClaim.commit` renames the staging folder to ``out`` (the old ``out`` moved aside and deleted only
  once the new one is in place); leaving the ``with`` block without a commit deletes the staging folder.

So an interrupted or failed run leaves no ``out`` and nothing half-written, and a folder that exists is complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import tempfile
import types
from collections.abc import Iterable

__all__ = ["FolderClaim", "check_out_folder"]


def check_out_folder(out: str | os.PathLike[str], overwrite: bool, *, what: str = "out") -> None:
    """Refuse an ``out`` that is a file, lies under a file, or is a non-empty folder (unless ``overwrite``)."""
    path = os.path.abspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{what}: {str(out)!r} is an existing file, not a folder")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{what}: {str(out)!r} lies under {parent!r}, which is a file")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise ValueError(
            f"{what}: the folder {str(out)!r} is not empty; choose a new folder or pass --overwrite "
            "(overwrite=True) to replace it"
        )


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


class FolderClaim:
    """Exclusive right to write the folder ``out`` (see the module docstring); a context manager.

    ``protect``: paths that must survive (a run's own inputs): ``out`` may neither be one of them nor contain one,
    since a commit replaces ``out`` as a whole. ``allowed``: when given, the only names an existing ``out`` may
    hold for ``overwrite`` to replace it (what the writer itself creates), so a folder of other files is never
    deleted.
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        what: str = "out",
        protect: Iterable[str | os.PathLike[str]] = (),
        allowed: Iterable[str] | None = None,
    ):
        self.out = os.path.abspath(out)
        self.overwrite, self.what = bool(overwrite), what
        self.protect = [os.path.realpath(p) for p in protect]
        self.allowed = None if allowed is None else set(allowed)
        self.parent, self.name = os.path.dirname(self.out), os.path.basename(self.out)
        self.stage: str | None = None
        self._lock_fd: int | None = None
        self._committed = False
        self._existing = self.parent  # the nearest folder above ``out`` that existed before the claim

    @property
    def lock_path(self) -> str:
        return os.path.join(self.parent, f".{self.name}.lock")

    def check_target(self) -> None:
        """Raise ValueError if ``out`` may not be written (see the class docstring)."""
        check_out_folder(self.out, self.overwrite, what=self.what)
        real = os.path.realpath(self.out)
        for p in self.protect:
            if _inside(p, real):
                raise ValueError(
                    f"{self.what}: {self.out!r} is, or holds, the input {p!r}; writing there would destroy "
                    "what is being read: choose another folder"
                )
        if self.allowed is not None and os.path.isdir(self.out):
            foreign = sorted(set(os.listdir(self.out)) - self.allowed)
            if foreign:
                raise ValueError(
                    f"{self.what}: {self.out!r} holds files this command did not write ({', '.join(foreign[:3])}"
                    f"{', ...' if len(foreign) > 3 else ''}); it replaces only its own folders: choose another one"
                )

    def _lock(self) -> None:
        """flock the lock file; retry if the file was replaced between our open and our lock (another run removed
        it on finishing), so that two runs never hold locks on two different files of one name."""
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise ValueError(
                    f"{self.what}: another process (pid {holder}) is writing {self.out!r} now; wait for it to "
                    "finish or choose another folder"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._lock_fd = fd
                with contextlib.suppress(OSError):  # the pid only informs a refused writer; a full disk may refuse it
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, str(os.getpid()).encode(), 0)
                return
            os.close(fd)

    def _remove_abandoned_stages(self) -> None:
        prefix = f".{self.name}.partial-"
        for entry in os.listdir(self.parent):
            if entry.startswith(prefix):
                shutil.rmtree(os.path.join(self.parent, entry), ignore_errors=True)

    def __enter__(self) -> FolderClaim:
        self.check_target()  # a clear refusal before touching anything
        self._existing = self.parent
        while not os.path.isdir(self._existing):
            self._existing = os.path.dirname(self._existing)
        try:
            os.makedirs(self.parent, exist_ok=True)
            self._lock()
        except OSError as e:
            raise self._named(e) from e
        try:
            self.check_target()  # again, holding the lock: another run may have finished meanwhile
            self._remove_abandoned_stages()
            # os.mkdir applies the umask (mkdtemp's 0700 would make the finished folder private); the name is
            # new because no other process writes stages of this folder while we hold the lock
            self.stage = os.path.join(self.parent, f".{self.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
            os.mkdir(self.stage)
        except OSError as e:
            self._release()
            raise self._named(e) from e
        except BaseException:
            self._release()
            raise
        return self

    def _named(self, exc: OSError) -> OSError:
        """``exc`` naming the folder the user asked for when it names no file or one of ours (a staging folder,
        the lock file); FileNotFoundError (a missing input) passes unchanged."""
        if isinstance(exc, FileNotFoundError) or exc.errno is None:
            return exc
        ours = exc.filename is None or os.path.basename(str(exc.filename)).startswith(f".{self.name}.")
        if self.stage is not None and exc.filename is not None:
            ours = ours or str(exc.filename).startswith(self.stage)
        return OSError(exc.errno, f"{exc.strerror} while writing", self.out) if ours else exc

    def commit(self) -> None:
        """Move the staging folder into place as ``out``."""
        old = None
        if os.path.isdir(self.out):
            self.check_target()
            old = tempfile.mkdtemp(prefix=f".{self.name}.old-", dir=self.parent)
            os.rmdir(old)
            os.rename(self.out, old)
        if self.stage is None:
            raise RuntimeError("FolderClaim.commit: the claim has no staging folder (used outside its `with`)")
        os.rename(self.stage, self.out)
        self._committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _release(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.lock_path)
            os.close(self._lock_fd)  # closing drops the lock
            self._lock_fd = None
        if not self._committed:  # the folders made for ``out`` go too, when nothing else was put in them
            folder = self.parent
            while folder != self._existing and _inside(folder, self._existing):
                try:
                    os.rmdir(folder)
                except OSError:
                    break
                folder = os.path.dirname(folder)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: types.TracebackType | None
    ) -> None:
        try:
            if not self._committed and self.stage is not None:
                shutil.rmtree(self.stage, ignore_errors=True)
        finally:
            self._release()
        if isinstance(exc, OSError):
            named = self._named(exc)
            if named is not exc:
                raise named from exc
