"""File-system safety, written once: atomic file writes, atomic directories and advisory locks.

A reader (another process, or a rerun after a crash) sees a file or directory written here either
as it was or as it is meant to be, never a part of it: it is written under a temporary sibling name
and renamed into place (``os.replace``), and the temporary is removed when the writing fails.
:func:`locked` and :func:`try_lock` take an exclusive ``fcntl.flock`` on a lock file, which the OS
releases when the process dies, so a killed job never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import IO, Callable, Iterator

from .errors import CompressError


def atomic_write(path: Path, write: Callable[[Path], object], *, fsync: bool = False, unique: bool = True) -> None:
    """``write(tmp)`` then rename over ``path``: readers see the old file or the new one, never a part.

    ``fsync`` flushes the temporary to disk before the rename (so the new file survives a power
    loss). ``unique`` names the temporary ``.NAME.<pid>-<random>.tmp``, for paths that several
    processes may write at once; without it the temporary is ``.NAME.tmp``, which the next write
    overwrites (a write killed half-way leaves no file that piles up: for one writer per directory)."""
    tag = f".{os.getpid()}-{uuid.uuid4().hex[:8]}" if unique else ""
    tmp = path.with_name(f".{path.name}{tag}.tmp")
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_text(path: Path, text: str, *, fsync: bool = False, unique: bool = True) -> None:
    """:func:`atomic_write` of ``text`` (``Path.write_text``)."""
    atomic_write(path, lambda tmp: tmp.write_text(text), fsync=fsync, unique=unique)


@contextlib.contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out`` only when the block finishes without error."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise CompressError(f"output directory '{out}' exists; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _apply_umask(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / out.name)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


def first_directory(out: Path, build: Callable[[Path], object]) -> Path:
    """``out``, built by ``build(tmp)`` unless it exists: when several processes build the same
    directory at once, the first to finish publishes it and the others discard their copies (a
    directory that readers may be using is never replaced)."""
    if out.is_dir():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        build(tmp)
        _apply_umask(tmp)
        os.replace(tmp, out)
    except OSError:
        if not out.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _apply_umask(root: Path) -> None:
    """mkdtemp and some writers create private files; give the finished tree the usual permissions."""
    mask = os.umask(0)
    os.umask(mask)
    for dirpath, _dirs, files in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~mask)


@contextlib.contextmanager
def locked(
    path: Path, *, on_wait: Callable[[], None] | None = None, on_refused: Callable[[OSError], None] | None = None
) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (its folder is made) held for the block.

    ``on_wait`` is called once if another process holds it, before waiting for it. A file system
    without locks raises its OSError, or, with ``on_refused``, calls it and runs the block
    unlocked. Without fcntl (Windows) it is a no-op."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:
            if on_refused is None:
                raise
            on_refused(e)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def try_lock(path: Path) -> IO[str] | None:
    """An exclusive advisory lock on ``path`` without waiting, held until the returned open file is
    closed (or the process exits); None when it cannot be had now (another process holds it, or
    the file system refuses locks)."""
    import fcntl

    f = open(path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    return f
