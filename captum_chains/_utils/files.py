"""Files written and read by the package: atomic writes and defensive safetensors reads.

Every file is written to a temporary name in its folder and moved into place with
``os.replace`` (atomic on POSIX file systems), so a crash or a full disk never leaves a
half-written file under the final name. Reads of safetensors files turn every way a
damaged, truncated or crafted file can fail into a ``ValueError`` naming the file.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import uuid
from pathlib import Path
from typing import Any

import torch

TMP_PREFIX = ".tmp-"
#: Largest safetensors header read (the package's files have headers of a few kB per layer).
MAX_HEADER = 64 * 1024 * 1024


def writable_file(path: str | Path, what: str) -> Path:
    """``path`` as a file to write: its folder is created; a folder at ``path`` is refused.

    Raises
    ------
    IsADirectoryError
        If ``path`` is an existing folder.
    OSError
        If the folder cannot be created (e.g. a file of that name, no permission).
    """
    target = Path(path).expanduser()
    if target.is_dir():
        raise IsADirectoryError(
            errno.EISDIR, f"cannot write the {what} onto a folder; give a file name", str(target)
        )
    parent = target.parent
    if parent.exists() and not parent.is_dir():
        raise NotADirectoryError(
            errno.ENOTDIR, f"cannot write the {what}: {parent} is a file, not a folder", str(parent)
        )
    parent.mkdir(parents=True, exist_ok=True)
    return target


def atomic_write(path: str | Path, data: bytes | str, what: str = "file") -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder.

    Parameters
    ----------
    path : str or Path
        The file (its folder is created if missing).
    data : bytes or str
        The content (``str`` is written as UTF-8).
    what : str
        What the file is, for error messages.

    Returns
    -------
    Path
        The file written.
    """
    target = writable_file(path, what)
    tmp = target.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex}-{target.name}")
    payload = data.encode() if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def write_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], what: str
) -> Path:
    """Save ``tensors`` and string ``metadata`` as a safetensors file, atomically."""
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata)
    return atomic_write(path, data, what)


def read_safetensors(path: str | Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file.

    Raises
    ------
    OSError
        If the file cannot be read (missing, no permission).
    ValueError
        If the file is not a complete, well-formed safetensors file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    source = Path(path).expanduser()
    if source.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"the {what} is a folder, not a file", str(source))
    data = source.read_bytes()
    problem = f"{source} is not a readable {what} (damaged, truncated or not a safetensors file)"
    if len(data) < 8:
        raise ValueError(f"{problem}: only {len(data)} bytes")
    (size,) = struct.unpack("<Q", data[:8])
    if size > min(MAX_HEADER, len(data) - 8):
        raise ValueError(f"{problem}: header of {size} bytes in a file of {len(data)}")
    try:
        header = json.loads(data[8 : 8 + size].decode("utf-8"))
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{problem}: {err}") from err
    if not isinstance(header, dict):
        raise ValueError(f"{problem}: the header is not a JSON object")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ValueError(f"{problem}: its metadata is not a mapping of strings")
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, TypeError, RuntimeError, OverflowError) as err:
        raise ValueError(f"{problem}: {' '.join(str(err).split())[:200]}") from err
    return tensors, metadata


def read_text(path: str | Path, what: str) -> str:
    """A UTF-8 text file; undecodable bytes raise ``ValueError`` naming the file."""
    source = Path(path).expanduser()
    try:
        return source.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{source} is not a readable {what} (not UTF-8 text: {err})") from err


def read_json(path: str | Path, what: str) -> Any:
    """A JSON file; damaged JSON raises ``ValueError`` naming the file."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{path} is not a readable {what} (damaged JSON: {err})") from err
