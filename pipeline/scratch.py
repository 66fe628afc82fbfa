"""Scratch checkpoints of `train`: one per configuration fingerprint, under the project root.

    <project>/build/train_state/FP.pt     the resumable checkpoint (model, EMA, AdamW moments, RNG states, losses)
    <project>/build/train_state/FP.json   the MLflow run of that training (so a resumed training continues it)
    <project>/build/train_state/FP.lock   held while a process trains that configuration

FP is the first 16 hex digits of pipeline.stages.run_fingerprint. Every copy of the project (the folder
itself, a DVC temporary copy under .dvc/tmp/exps/, a retried Prefect task, a rerun sweep) finds the same files,
so a killed training continues from its last checkpoint wherever it runs again. A finished training removes
them. `python -m pipeline checkpoints` lists those left behind and removes the ones that will never resume.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
import fcntl
import os
from pathlib import Path
import time
from typing import Iterator

from .paths import scratch_dir


@dataclass(frozen=True)
class Scratch:
    checkpoint: Path
    record: Path     # the MLflow run's id
    shared: bool     # False: another process trains this configuration; this one uses files of its own

    def remove(self) -> None:
        for path in (self.checkpoint, self.record):
            path.unlink(missing_ok=True)


def _lock(path: Path):
    """The open lock file, locked, or None when another process holds it."""
    handle = open(path, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


@contextlib.contextmanager
def claim(fingerprint: str) -> Iterator[Scratch]:
    """The scratch files of this configuration, locked for this process. Two processes that train the same
    configuration at once (points of a sweep that differ only after training) do not share one checkpoint:
    the second gets files named after its pid, trains from step 0 and removes them when it ends."""
    folder = scratch_dir()
    folder.mkdir(parents=True, exist_ok=True)
    name = fingerprint[:16]
    handle = _lock(folder / f"{name}.lock")
    if handle is None:
        name = f"{name}-{os.getpid()}"
        handle = _lock(folder / f"{name}.lock")
    try:
        yield Scratch(folder / f"{name}.pt", folder / f"{name}.json", "-" not in name)
    finally:
        if "-" in name:
            (folder / f"{name}.lock").unlink(missing_ok=True)
        handle.close()


@dataclass(frozen=True)
class Entry:
    name: str
    size: int          # bytes of the checkpoint and its record
    age_s: float       # since the checkpoint was last written
    step: int | None   # the checkpoint's step and its run's total (None: no checkpoint written yet)
    steps: int | None
    run_id: str
    in_use: bool       # a live process holds its lock: it is training now


def entries() -> list[Entry]:
    """Every configuration with scratch files left, oldest first."""
    import json

    import torch

    folder, out = scratch_dir(), []
    names = {p.name.split(".")[0] for p in folder.glob("*.pt")} | {p.stem for p in folder.glob("*.json")}
    for name in sorted(names):
        ckpt, record = folder / f"{name}.pt", folder / f"{name}.json"
        step = steps = None
        if ckpt.exists():
            with contextlib.suppress(Exception):  # a damaged file is listed (and removable) all the same
                state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
                step, steps = int(state["step"]), int(state["train_config"]["steps"])
        run_id = ""
        with contextlib.suppress(Exception):
            run_id = json.loads(record.read_text())["run_id"]
        handle = _lock(folder / f"{name}.lock") if (folder / f"{name}.lock").exists() else None
        in_use = (folder / f"{name}.lock").exists() and handle is None
        if handle is not None:
            handle.close()
        files = [p for p in (ckpt, record) if p.exists()]
        newest = max((p.stat().st_mtime for p in files), default=time.time())
        out.append(Entry(name, sum(p.stat().st_size for p in files), time.time() - newest, step, steps, run_id, in_use))
    return sorted(out, key=lambda e: -e.age_s)


def remove(name: str) -> bool:
    """Remove one configuration's scratch files, unless a process is training it now."""
    folder = scratch_dir()
    lock = folder / f"{name}.lock"
    handle = _lock(lock)
    if handle is None:
        return False
    try:
        for suffix in (".pt", ".json"):
            (folder / f"{name}{suffix}").unlink(missing_ok=True)
        for tmp in folder.glob(f".{name}.pt.tmp-*"):  # a write cut short by a kill
            tmp.unlink(missing_ok=True)
        lock.unlink(missing_ok=True)
    finally:
        handle.close()
    return True
