"""Atomic artifact writes: every file appears complete or not at all, so any step can be killed and resumed.

A write the file system refuses (full disk, quota, permissions, read-only mount) raises a one-line LofaError that
names the file, after the temp file is removed and with the old file, if any, untouched.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

from lofa.errors import LofaError

_UMASK = os.umask(0)
os.umask(_UMASK)

# errno of a write the file system refuses -> (what went wrong, what to do): the user's to fix, not a bug
WRITE_ERRORS = {
    errno.ENOSPC: ("no space left on device", "free space and rerun"),
    errno.EDQUOT: ("disk quota exceeded", "free space and rerun"),
    errno.EACCES: ("permission denied", "make the folder writable or write somewhere else"),
    errno.EPERM: ("operation not permitted", "make the folder writable or write somewhere else"),
    errno.EROFS: ("read-only file system", "write somewhere else"),
}


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temp file lives in the same folder so the final `os.replace` is atomic on POSIX. A write the file system
    refuses (`WRITE_ERRORS`: from the folder, the temp file, the block's writes, safetensors' included, or the
    rename) becomes a LofaError "cannot write <path>: <reason>; <what to do>".
    """
    path = Path(path)
    tmp = None
    try:
        with _refused_writes(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            tmp = Path(name)
            os.close(fd)
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; artifacts get open()'s permissions
            yield tmp
            os.replace(tmp, path)
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; it replaces `path` (a folder) only if the block succeeds.

    A write the file system refuses becomes the same one-line LofaError as in `atomic_path` (a safetensors file
    written in the block included), and the temporary folder is removed; the old folder stays whole.
    """
    import shutil

    path = Path(path)
    tmp = None
    try:
        with _refused_writes(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
            yield tmp
            old = None
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
                os.replace(path, old / path.name)
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old)
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp)


@contextlib.contextmanager
def _refused_writes(path: Path) -> Iterator[None]:
    """Inside, a write the file system refuses (an OSError of WRITE_ERRORS, or safetensors' text of one) becomes
    the one-line LofaError "cannot write <path>: <reason>; <what to do>"; any other error passes as it is."""
    try:
        yield
    except Exception as e:
        os_error = _os_error(e)
        if os_error is None or os_error.errno not in WRITE_ERRORS:
            raise
        reason, fix = WRITE_ERRORS[os_error.errno]
        raise LofaError(f"cannot write {path}: {reason}; {fix}") from e


def _os_error(err: Exception) -> OSError | None:
    """The OSError behind a safetensors write error, which gives the file system's error only as text ("I/O error:
    No space left on device (os error 28)"); None for any other error."""
    from safetensors import SafetensorError

    if isinstance(err, OSError):
        return err
    found = re.search(r"\(os error (\d+)\)", str(err)) if isinstance(err, SafetensorError) else None
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code))


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    path = Path(path)
    if not path.exists():
        return default
    return json.loads(path.read_text())


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """safetensors.torch.save_file, atomically. Tensors are made contiguous (safetensors requires it)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


class _WriteErrorKeeper:
    """A binary file for torch.save that keeps the OSError of a write that failed. torch.save catches it and raises
    a RuntimeError ("unexpected pos ...") in its place, which has lost what went wrong (a full disk: ENOSPC)."""

    def __init__(self, f):
        self.f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """torch.save, atomically (for optimizer states and other non-tensor-dict checkpoints)."""
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        out = _WriteErrorKeeper(f)
        try:
            torch.save(obj, out)
        except RuntimeError:
            if out.error is None:
                raise
            raise out.error
