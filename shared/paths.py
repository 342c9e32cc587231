"""Paths that must stay under a root: files read under the data root (paths arriving in
messages, files found by the watcher) and outputs written under the products / state roots.

    from shared.paths import PathError, resolve_under, ensure_writable_under
    frame = resolve_under(settings.data_root, ref.path)          # PathError when it escapes
    out = ensure_writable_under(settings.products_root, "BORN/BIAS01/results.json")

Refused, with :class:`PathError` naming the path and the reason: an empty path, a NUL byte, an
absolute path, any ``..`` component, and a path whose resolution (symbolic links followed)
lands outside the root. Only the lexical form and the file system's links are looked at: the
file need not exist (existence is the caller's business).
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath


class PathError(ValueError):
    """A path refused because it would leave its root; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: object, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path!r}: {reason}")


def _text(path: str | os.PathLike) -> str:
    try:
        text = os.fspath(path)
    except TypeError:
        raise PathError(path, f"not a path ({type(path).__name__})") from None
    if isinstance(text, bytes):
        try:
            text = text.decode()
        except UnicodeDecodeError:
            raise PathError(path, "not valid UTF-8") from None
    return text


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _root(root: str | os.PathLike) -> Path:
    return Path(_text(root)).resolve()


def resolve_under(root: str | os.PathLike, relative: str | os.PathLike) -> Path:
    """The resolved absolute path of ``relative`` inside ``root`` (symbolic links followed).

    Raises :class:`PathError` for an empty or absolute path, a ``..`` component, a NUL byte, or a
    path that resolves outside ``root`` (a symbolic link pointing out of it)."""
    text = _text(relative)
    if not text.strip():
        raise PathError(text, "empty path")
    if "\x00" in text:
        raise PathError(text, "NUL byte in the path")
    if os.path.isabs(text) or PurePosixPath(text).is_absolute() or PureWindowsPath(text).anchor:
        raise PathError(text, "absolute path refused (paths must be relative to the root)")
    parts = PurePosixPath(text.replace("\\", "/")).parts
    if ".." in parts:
        raise PathError(text, "'..' component refused (it could leave the root)")
    base = _root(root)
    try:
        resolved = (base / text).resolve()
    except (OSError, RuntimeError) as exc:  # symlink loop, name too long
        raise PathError(text, f"cannot be resolved: {exc}") from None
    if not _inside(resolved, base):
        raise PathError(text, f"resolves outside the root {base} (symbolic link to {resolved})")
    return resolved


def ensure_writable_under(root: str | os.PathLike, path: str | os.PathLike, mkdir: bool = True) -> Path:
    """The resolved path of an output ``path`` (absolute, or relative to ``root``) after checking
    that it stays under ``root``; with ``mkdir`` its parent folders are created.

    Raises :class:`PathError` when it would leave the root; ``OSError`` from creating the folders
    (disk full, permission denied) is left to the caller (see :mod:`shared.storage`)."""
    text = _text(path)
    base = _root(root)
    if not text.strip():
        raise PathError(text, "empty path")
    if "\x00" in text:
        raise PathError(text, "NUL byte in the path")
    candidate = Path(text)
    if candidate.is_absolute():
        if ".." in candidate.parts:
            raise PathError(text, "'..' component refused (it could leave the root)")
        try:
            resolved = candidate.resolve()
        except (OSError, RuntimeError) as exc:
            raise PathError(text, f"cannot be resolved: {exc}") from None
        if not _inside(resolved, base):
            raise PathError(text, f"outside the output root {base}")
    else:
        resolved = resolve_under(base, text)
    if resolved == base:
        raise PathError(text, "is the root itself, not a file under it")
    if mkdir:
        resolved.parent.mkdir(parents=True, exist_ok=True)
    return resolved


__all__ = ["PathError", "ensure_writable_under", "resolve_under"]
