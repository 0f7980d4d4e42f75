"""File-system safety, written once: atomic file writes, atomic directories and advisory locks.

A reader (another process, or a rerun after a crash) sees a file or directory written here either
as it was or as it is meant to be, never a part of it: it is written under a temporary sibling name
and renamed into place (``os.replace``), and the temporary is removed when the writing fails.
:func:`locked` and :func:`try_lock` take an exclusive ``fcntl.flock`` on a lock file, which the OS
releases when the process dies, so a killed job never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import errno
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
    except BaseException as e:
        full = disk_full(e, path)  # judged before the partial file is removed (its space is freed then)
        with contextlib.suppress(OSError):
            tmp.unlink()
        if full is not None:
            raise full from e
        raise


#: a write that fails without an errno (torch's zip writer, safetensors) with less than this free
#: on the target's file system is a full disk
_NEARLY_FULL = 64 * 1024**2


def free_bytes(path: Path) -> int | None:
    """Bytes free to this user on the file system of ``path`` (or of its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def disk_full(e: BaseException, path: Path) -> OSError | None:
    """``e`` as ``OSError(ENOSPC)`` when it is a full disk (or quota) in any writer's disguise: an OSError
    with that errno, a message saying so, or a short write (torch's ``inline_container``, safetensors)
    on a file system that is nearly full; None otherwise."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return e
    if not isinstance(e, Exception) or isinstance(e, CompressError):
        return None
    text = str(e)
    if any(s in text for s in ("No space left", "os error 28", "Disk quota exceeded", "os error 122")):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    # an OSError with another errno says what it is; a writer's own error without one may hide ENOSPC
    short_write = (not isinstance(e, OSError) or not e.errno) and any(
        s in text for s in ("inline_container", "file write failed", "unexpected pos", "write", "Write"))
    free = free_bytes(path)
    if short_write and free is not None and free < _NEARLY_FULL:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return None


def disk_full_error(path: Path, need: int | None, then: str) -> CompressError:
    """The one line for a full disk: what was being written, about how much more is needed, and
    ``then`` (what is kept and how to go on)."""
    amount = ("more space is needed" if not need or need < 2**20 else
              f"about {need / 1024**3:.1f} GiB more are needed" if need >= 2**30 else f"about {need / 1024**2:.1f} MiB more are needed")
    return CompressError(f"disk full while writing '{path}': {amount}; {then}")


@contextlib.contextmanager
def writing(path: Path, need: int | None, then: str) -> Iterator[None]:
    """Any write failure inside the block as one line: a full disk (however the writer reports it)
    with :func:`disk_full_error`, another OSError with its reason; ``then`` says what is kept and
    how to go on."""
    try:
        yield
    except CompressError:
        raise
    except Exception as e:
        if disk_full(e, path) is not None:
            raise disk_full_error(path, need, then) from None
        if isinstance(e, OSError):
            raise CompressError(f"cannot write '{getattr(e, 'filename', None) or path}': {e.strerror or e}; {then}") from None
        raise


def atomic_text(path: Path, text: str, *, fsync: bool = False, unique: bool = True) -> None:
    """:func:`atomic_write` of ``text`` (``Path.write_text``)."""
    atomic_write(path, lambda tmp: tmp.write_text(text), fsync=fsync, unique=unique)


@contextlib.contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out`` only when the block finishes without error.

    The temporary ``.OUT.tmp-TAG`` is held under a lock (``.OUT.tmp-TAG.lock``) while this process
    builds it; leftovers of a killed writer (their lock free) are removed by the next writer of ``out``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise CompressError(f"output directory '{out}' exists; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tag = f"{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    lock_path = out.parent / f".{tag}.lock"
    lock = try_lock(lock_path)  # taken before the directory exists, so no cleaner sees it unlocked
    tmp = out.parent / f".{tag}"
    trash = out.parent / f".{tag}.old"
    try:
        tmp.mkdir(mode=0o700)
        try:
            yield tmp
            _apply_umask(tmp)
        except BaseException as e:
            full = disk_full(e, tmp)  # judged before the partial directory is removed
            shutil.rmtree(tmp, ignore_errors=True)
            if full is not None and full is not e:
                raise full from e
            raise
        if out.exists():
            trash.mkdir()
            os.replace(out, trash / out.name)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if lock is not None:
            lock.close()
        with contextlib.suppress(OSError):
            lock_path.unlink()


def remove_stale(out: Path) -> None:
    """Remove the temporaries that writers of ``out`` killed mid-write left beside it (those whose lock
    no process holds; a temporary without a lock file is from a writer that never took one)."""
    prefix = f".{out.name}.tmp-"
    for p in out.parent.glob(prefix + "*"):
        if p.name.endswith(".lock"):
            continue
        base = p.name[: -len(".old")] if p.name.endswith(".old") else p.name
        lock_path = p.parent / f"{base}.lock"
        if lock_path.exists():
            f = try_lock(lock_path)
            if f is None:
                continue  # a live writer
            f.close()
        shutil.rmtree(p, ignore_errors=True)
    for lock_path in out.parent.glob(prefix + "*.lock"):
        if not lock_path.with_suffix("").exists() and not Path(str(lock_path.with_suffix("")) + ".old").exists():
            f = try_lock(lock_path)
            if f is not None:
                f.close()
                with contextlib.suppress(OSError):
                    lock_path.unlink()


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
