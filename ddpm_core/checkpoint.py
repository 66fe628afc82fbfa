"""Checkpoints: atomic writes, and loads that never execute code.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts with a `format` tag. It is written to a
temporary file in the same folder, fsynced, loaded back to check it, and only then moved over the old one with
os.replace, so a kill at any moment leaves either the old or the new checkpoint, never a broken one.
Loading uses torch.load(weights_only=True): a pickle that would run code is refused, never executed.
A sha256 of the contents (every tensor's bytes, dtype and shape, every other value, by key) is written with them
and checked on load: torch's zip reader does not check its CRCs, so without it a flipped bit in the weights of a
damaged file would load silently. Files written before the digest existed load unchecked.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
import pickle
from typing import Any

import torch

FORMAT = "ddpm_core.checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A file that is missing, damaged or not one of ours."""


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a loadable ddpm_core checkpoint (refused by weights_only load): "
                              f"{first}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a ddpm_core checkpoint (no '{FORMAT}' format tag)")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {ckpt.get('version')}; this code reads {VERSION}")
    expected = ckpt.pop("digest", None)
    if expected is not None and digest(ckpt) != expected:
        raise CheckpointError(f"{path} is damaged: its contents do not match the sha256 written with them")
    return ckpt


def digest(obj: Any) -> str:
    """sha256 of a checkpoint's contents: dict keys in order, tensors by dtype, shape and bytes, other values
    by repr."""
    h = hashlib.sha256()

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
        elif isinstance(x, dict):
            h.update(b"{")
            for k in sorted(x, key=repr):
                h.update(repr(k).encode())
                walk(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                walk(v)
            h.update(b"]")
        else:
            h.update(repr(x).encode())

    walk(obj)
    return h.hexdigest()


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Atomically write `state` (plus the format tag) to `path`. A write that fails (a full disk, a quota, an I/O
    error) raises CheckpointError in one line and leaves the previous checkpoint at `path` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        payload = {"format": FORMAT, "version": VERSION, **state}
        with open(tmp, "wb") as f:
            torch.save({**payload, "digest": digest(payload)}, f)
            f.flush()
            os.fsync(f.fileno())
        load_checkpoint(tmp)  # the old checkpoint is replaced only by one that loads
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except (OSError, RuntimeError) as e:
        # torch's zip writer reports a full disk as a RuntimeError raised while handling the OSError
        cause = e if isinstance(e, OSError) else e.__context__
        if not isinstance(cause, OSError):
            raise
        kept = "the previous checkpoint is kept" if path.exists() else "no earlier checkpoint exists"
        raise CheckpointError(f"could not write the checkpoint {path} ({cause.strerror or cause}); {kept}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
