"""Files in and out: inputs checked readable, outputs that never resolve to an input, atomic writes.

Every output file is written in a private folder beside its place and moved there only when it is complete, so
a failed write (disk full, file-size limit, a kill mid-write) leaves the previous file as it was.
Output paths are checked before any work starts, so that a bad one never costs an inference.
"""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import InputError


def readable(path: str | os.PathLike, what: str, folder: bool = False, error: type[Exception] = InputError,
             hint: str = "check the path") -> Path:
    """``path`` after checking that this process can open it for reading; ``folder`` allows a folder too.

    Raises ``error`` saying which is true: it does not exist (then ``hint`` follows), it is a folder (or not a
    regular file), or it is not readable, and why.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: a named pipe must not hang the check
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist; {hint}") from None
    except PermissionError:
        raise error(f"{what} {path} is not readable (permission denied): give this user read access to it and "
                    "to its folders") from None
    except OSError as exc:
        raise error(f"{what} {path} is not readable: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
    finally:
        os.close(fd)
    if stat.S_ISDIR(mode) and not folder:
        raise error(f"{what} {path} is a folder, not a file")
    if not stat.S_ISDIR(mode) and not stat.S_ISREG(mode):
        raise error(f"{what} {path} is not a regular file (a device, pipe or socket)")
    return path


def _same_file(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links: two names, one file
    except OSError:
        return False


def _writable_folder(folder: Path, what: str) -> None:
    """The nearest existing ancestor of ``folder`` must be a folder this process may write into."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{what}: {existing} is a file, so the folder {folder} cannot be created there")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{what}: the folder {existing} is not writable")


def check_output_file(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None],
                      suffixes: tuple[str, ...]) -> Path:
    """Refuse, before any work, an output file that resolves to one of ``inputs`` (any spelling, symbolic or
    hard link), exists as something other than a regular file, lacks one of ``suffixes``, or whose folder is a
    file or not writable. Returns the path."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"output {path} is a folder: give a file name, e.g. {path / ('label' + suffixes[0])}")
    if not path.name.endswith(suffixes):
        raise InputError(f"output {path} has an unknown file type: end its name in one of {', '.join(suffixes)}")
    for source in inputs:
        if source is not None and _same_file(path, Path(source)):
            raise InputError(f"output {path} is the input {source}: writing it would destroy the input; "
                             "choose another output name (nothing was written)")
    if path.exists() and not path.is_file():
        raise InputError(f"output {path} exists and is not a regular file (a device, pipe or socket)")
    _writable_folder(path.absolute().parent, f"output {path}")
    return path


def check_output_folder(path: str | os.PathLike) -> Path:
    """Refuse, before any work, an output folder that exists as a file or cannot be created. Returns the path."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"output folder {path} is a file: give a folder (it is created when missing)")
    _writable_folder(path.absolute(), f"output folder {path}")
    return path


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Write ``path`` through ``write(temporary)`` and move the file into place once it is complete.

    ``temporary`` has ``path``'s own name, in a private folder beside it (same file system, so the final rename is
    atomic; writers that take the format or a bundle's name from the file name, as SimpleITK, MRML and matplotlib
    do, see the real one). On any failure the temporary folder is removed and ``path`` keeps its previous
    content; an OSError, RuntimeError (SimpleITK's) or InputError (the MRML bridge's) becomes an InputError
    naming ``path`` and the reason. The parent folder is created when missing. Returns ``path``.
    """
    path = Path(path)
    staging = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=path.parent))
        temporary = staging / path.name
        write(temporary)
        fd = os.open(temporary, os.O_RDONLY)  # FileNotFoundError when the writer wrote nothing
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException as exc:
        if isinstance(exc, (OSError, RuntimeError, InputError)):
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip()
            reason = reason.splitlines()[-1] if reason else type(exc).__name__
            kept = "the previous file is unchanged" if path.is_file() else "nothing was written"
            raise InputError(f"cannot write {path}: {reason} ({kept})") from exc
        raise
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """:func:`write_atomic` for UTF-8 text."""
    return write_atomic(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def save_figure(fig, path: str | os.PathLike, dpi: int = 80) -> Path:
    """Write a matplotlib figure atomically (the format from the suffix) and close it."""
    import matplotlib.pyplot as plt

    try:
        return write_atomic(path, lambda temporary: fig.savefig(temporary, dpi=dpi))
    finally:
        plt.close(fig)
