"""Files and directories written whole or not at all, and files read with their name in every error.

Writes go to a temporary name in the same directory, then an atomic rename. Written files get the permissions a
plain ``open(path, "w")`` gives: an existing file keeps its mode, a new one gets ``0o666`` less the umask (the
temporary files of :mod:`tempfile` are ``0o600``, which would hide shared patterns and results from other users).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checks import UsageError

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``os.umask`` has no read-only form)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(path: Path, new: int) -> int:
    """The mode ``open``/``mkdir`` would leave ``path`` with: its current mode, else ``new`` less the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return new & ~_umask()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path``; a reader sees the old file or the new one, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _mode_for(path, 0o666))
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def save_figure(fig: "Figure", path: str | os.PathLike[str], **savefig: Any) -> Path:
    """``fig`` as a PNG at ``path`` (``savefig`` options such as ``bbox_inches`` pass through)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    try:
        os.fchmod(fd, _mode_for(path, 0o666))
        os.close(fd)
        fig.savefig(tmp, dpi=120, **savefig)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def replace_directory(
    target: str | os.PathLike[str], fill: Callable[[Path], None], keep: Callable[[str], bool] = lambda name: False
) -> Path:
    """Build a new directory with ``fill(new)`` and swap it in for ``target`` as a whole.

    The new directory is made beside ``target``; entries of an existing ``target`` for which ``keep(name)`` is
    true are copied into it first. If ``target`` does not exist the swap is one atomic rename; otherwise the old
    directory is renamed aside, the new one renamed in and the old one deleted (a failed second rename puts the
    old one back). A reader sees the old directory or the new one, never a mix; if anything fails, ``target``
    is left as it was.
    """
    target = Path(target)
    if target.is_symlink():  # replace the directory the link points to, and keep the link
        target = target.resolve()
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{str(target)!r} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".new", dir=target.parent))
    try:
        os.chmod(new, _mode_for(target, 0o777))
        if target.is_dir():
            for entry in sorted(target.iterdir()):
                if keep(entry.name):
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.copytree(entry, new / entry.name, symlinks=True)
                    else:
                        shutil.copy2(entry, new / entry.name, follow_symlinks=False)
        fill(new)
        _swap_in(new, target)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    return target


def _swap_in(new: Path, target: Path) -> None:
    if not target.exists():
        os.rename(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.rmdir(old)  # only the unique name is wanted; the rename below creates it
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- reading
def read_text(path: str | os.PathLike[str], what: str = "file") -> str:
    """The UTF-8 text of ``path``; a ``UsageError`` naming the file for undecodable bytes."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(
            f"{what} {str(path)!r} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})"
        ) from None


def parse_json(text: str, where: str) -> Any:
    """``json.loads`` whose errors name ``where`` (a file, or a file and line)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"{where} is not valid JSON: {err}") from None
    except RecursionError:
        raise UsageError(f"{where} is not valid JSON: nested too deeply") from None


def read_json(path: str | os.PathLike[str], what: str = "file") -> Any:
    """The JSON value in ``path``; every error names the file."""
    return parse_json(read_text(path, what), f"{what} {str(path)!r}")


def read_safetensors(path: str | os.PathLike[str], what: str = "file") -> tuple[dict[str, Any], dict[str, str]]:
    """The tensors and the metadata of a safetensors file; a damaged file is a ``UsageError`` naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise UsageError(f"{what} {str(path)!r} is not a readable safetensors file: {err}") from None
    return tensors, metadata
