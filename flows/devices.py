"""Sweep points placed on devices: `--devices 0,1,2,3` runs up to that many points at once, each with
CUDA_VISIBLE_DEVICES set to the GPUs it holds. A point takes as many as its train.devices (a 2-rank point
holds two) and gives them back when it ends; the train stage inside sees its GPUs as cuda:0, cuda:1, ...
The devices a point ran on are in its environment, so its MLflow run records them (pipeline.tracking.env_tags).
"""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path
import threading
from typing import Iterator

import yaml

from flows.points import Point
from pipeline.params import ParamsError


class DevicePool:
    """GPU ids lent to points: take(k) waits until k are free; give() returns them."""

    def __init__(self, ids: list[int]):
        self.ids, self.free = list(ids), list(ids)
        self.cond = threading.Condition()

    def take(self, k: int) -> list[int]:
        if k > len(self.ids):
            raise ValueError(f"a point needs {k} devices and --devices gives {len(self.ids)}")
        with self.cond:
            self.cond.wait_for(lambda: len(self.free) >= k)
            got, self.free = self.free[:k], self.free[k:]
            return got

    def give(self, ids: list[int]) -> None:
        with self.cond:
            self.free = [i for i in self.ids if i in self.free or i in ids]
            self.cond.notify_all()


_POOLS: dict[str, DevicePool] = {}  # by key: a Prefect task gets the key, not the lock-holding object
_KEYS = itertools.count()


def register(ids: list[int]) -> str:
    key = f"pool-{next(_KEYS)}"
    _POOLS[key] = DevicePool(ids)
    return key


def release(key: str) -> None:
    _POOLS.pop(key, None)


@contextlib.contextmanager
def held(key: str, k: int) -> Iterator[str]:
    """CUDA_VISIBLE_DEVICES for a point that needs k devices of pool `key`, held for the block."""
    pool = _POOLS[key]
    ids = pool.take(k)
    try:
        yield ",".join(str(i) for i in ids)
    finally:
        pool.give(ids)


def parse_devices(text: str) -> list[int]:
    """'0,1,2,3' -> [0, 1, 2, 3] (the argparse type of --devices)."""
    try:
        ids = [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise ParamsError(f"--devices {text!r} is not a list of GPU numbers (e.g. 0,1,2,3)") from None
    return ids


def check_devices(devices: list[int] | None, concurrency: int, deployment: str | None) -> None:
    if devices is None:
        return
    if not devices or len(set(devices)) != len(devices) or any(d < 0 for d in devices):
        raise ParamsError(f"devices = {devices} is not allowed: give distinct GPU numbers >= 0 (e.g. 0,1,2,3)")
    if concurrency != 1:
        raise ParamsError(f"give devices or concurrency, not both: with devices = {devices} up to {len(devices)} "
                          f"points run at once, one per free device")
    if deployment:
        raise ParamsError("devices place points in this checkout; workers of a pool own their GPUs (one worker per "
                          "GPU, see the README)")


def point_devices(root: Path, point: Point) -> int:
    """How many devices the point's training takes: its train.devices, else params.yaml's."""
    settings = point.settings()
    if "train.devices" in settings:
        return int(settings["train.devices"])
    return int(yaml.safe_load((root / "params.yaml").read_text())["train"].get("devices", 1))
