"""Atomic file writes: write beside the target under a temporary name, then rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder (same suffix); on success rename it onto
    ``path``; on any exception remove it, so no partial file is ever left behind."""
    target = Path(path)
    if not target.parent.exists():
        raise FileNotFoundError(f"output folder does not exist: {target.parent}")
    tmp_path = temp_beside(target)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def temp_beside(target: str | os.PathLike, directory: bool = False) -> Path:
    """Create an empty temporary file (or folder) in ``target``'s folder, so that renaming it onto
    ``target`` is atomic, named ``.<stem>.tmp-XXXXXXXX<suffix>`` (the real suffix last, for tools
    that go by it) and with the mode a plain ``open()`` (``mkdir``) would give; return its path."""
    target = Path(target)
    prefix, suffix = f".{target.stem}.tmp-", target.suffix
    if directory:
        tmp = tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=target.parent)
    else:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=target.parent)
        os.close(fd)
    _grant_default_mode(tmp, directory)
    return Path(tmp)


def _umask() -> int:
    """The process umask. Linux reports it in /proc/self/status; elsewhere it can only be read by
    setting it, so it is set back at once."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _grant_default_mode(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a file (or folder) made by ``mkstemp`` (``mkdtemp``) the mode a plain ``open()``
    (``mkdir``) would: 0o666 (0o777) less the umask. Their private 0o600 / 0o700 is meant for
    temporary files; an output renamed into place must read like any other file the user writes.
    Best effort: where the filesystem refuses modes (vfat without ``quiet``, some network mounts)
    the output keeps the temporary mode rather than failing the write."""
    try:
        os.chmod(path, (0o777 if directory else 0o666) & ~_umask())
    except PermissionError:
        pass
