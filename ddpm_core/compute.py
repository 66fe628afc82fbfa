"""Where and how a run computes: device, precision and the distributed world, decided in this one place.

Precision rule (`auto`): bf16 autocast where the device computes bf16 natively, fp32 elsewhere.
    CUDA    compute capability >= 8.0 (Ampere and later)
    CPU     flags include avx512_bf16 (AMD Zen 4, Intel Cooper Lake) or amx_bf16 (Sapphire Rapids and later)
Elsewhere oneDNN emulates bf16 and a training step ran about 9x slower than fp32, so an explicit `bf16` there
is refused in one line naming the device and the missing capability. (`torch.ops.mkldnn.
_is_mkldnn_bf16_supported()` is true on plain AVX-512 too, so the CPU flags decide, not torch.)

bf16 applies to the network only (`Autocast`): its output is cast back to float32, so the losses, the sampler's
arithmetic and the schedule coefficients stay fp32/fp64 whatever the precision.

The world: under torchrun the environment names this process's RANK, WORLD_SIZE and LOCAL_RANK; the backend is
nccl on CUDA (one GPU per rank, cuda:LOCAL_RANK) and gloo on the CPU. One process is world size 1.

Everything that trains or samples calls `resolve` and records `Compute.describe()` with its results; the
capabilities are detected once (`Capabilities.detect`) and can be given instead, which is how tests inject a
CUDA 8.0 or an avx512_bf16 machine.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
import os
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping

import torch
from torch import nn

Precision = Literal["fp32", "bf16"]
PrecisionSetting = Literal["auto", "fp32", "bf16"]
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
NATIVE_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
MIN_CUDA_CAPABILITY = (8, 0)


class ComputeError(ValueError):
    """A device or precision this machine cannot give; str() is one line naming the device and what it lacks."""


@dataclass(frozen=True)
class Gpu:
    name: str
    capability: tuple[int, int]


@dataclass(frozen=True)
class Capabilities:
    """What the machine offers: the CPU's model name and flags, and the visible CUDA GPUs."""

    cpu_name: str
    cpu_flags: frozenset[str]
    gpus: tuple[Gpu, ...] = ()

    @classmethod
    def detect(cls, cpuinfo: str | Path = "/proc/cpuinfo") -> Capabilities:
        name, flags = read_cpuinfo(cpuinfo)
        gpus = ()
        if torch.cuda.is_available():
            gpus = tuple(Gpu(torch.cuda.get_device_name(i), tuple(torch.cuda.get_device_capability(i)))
                         for i in range(torch.cuda.device_count()))
        return cls(name, flags, gpus)


def read_cpuinfo(path: str | Path = "/proc/cpuinfo") -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first processor in /proc/cpuinfo; ("unknown CPU", {}) where it is missing."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "unknown CPU", frozenset()
    name, flags = "unknown CPU", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and name == "unknown CPU":
            name = " ".join(value.split())
        elif key in ("flags", "Features") and not flags:  # x86 / ARM spelling
            flags = frozenset(value.split())
    return name, flags


@dataclass(frozen=True)
class World:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""  # "nccl" | "gloo"; "" for one process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_type: str, env: Mapping[str, str] | None = None) -> World:
        env = os.environ if env is None else env
        size = int(env.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        return cls(int(env["RANK"]), size, int(env.get("LOCAL_RANK", "0")), "nccl" if device_type == "cuda" else "gloo")


@dataclass(frozen=True)
class Compute:
    """The resolved answer: where this process computes, in which precision, as which rank."""

    device: torch.device
    precision: Precision
    device_name: str          # the CPU's model name or the GPU's name
    bf16_native: str          # the capability that makes bf16 native ("avx512_bf16", "compute capability 8.0"), or ""
    lacks: str                # where bf16 is not native: what is missing, for messages and reports
    world: World = field(default_factory=World)
    emulated: bool = False    # bf16 without native support: only benchmarks ask for it (resolve(emulate=True))

    def describe(self) -> dict[str, Any]:
        """What ran, for checkpoints, metrics.json, MLflow and the registry (flat, JSON-safe)."""
        return {"precision": self.precision, "device": self.device.type, "device_name": self.device_name,
                "bf16_native": self.bf16_native or f"no ({self.lacks})", "world_size": self.world.world_size,
                "backend": self.world.backend or "none", "torch": torch.__version__.split("+")[0]}

    def summary(self) -> str:
        """'bf16 autocast on cpu (AMD EPYC, avx512_bf16), 1 process' (one phrase for descriptions and logs)."""
        how = "bf16 autocast" + (" (emulated)" if self.emulated else "") if self.precision == "bf16" else "fp32"
        why = self.bf16_native or f"no native bf16: {self.lacks}"
        n = self.world.world_size
        return f"{how} on {self.device.type} ({self.device_name}, {why}), {n} process{'es' if n > 1 else ''}"

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device.type, self.precision)

    def network(self, net: nn.Module) -> nn.Module:
        """`net` as this precision runs it: itself in fp32, wrapped in `Autocast` in bf16."""
        return Autocast(net, self.device.type) if self.precision == "bf16" else net


def autocast(device_type: str, precision: Precision) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


class Autocast(nn.Module):
    """net(x, t) under bf16 autocast, its output cast back to float32 (what consumes it stays fp32)."""

    def __init__(self, net: nn.Module, device_type: str):
        super().__init__()
        self.net, self.device_type = net, device_type

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            out = self.net(x, t)
        return out.float()


# --- the rules --------------------------------------------------------------------------------------------
def bf16_support(device: torch.device, caps: Capabilities) -> tuple[str, str]:
    """(the capability that makes bf16 native here or "", what is missing or "")."""
    if device.type == "cuda":
        gpu = caps.gpus[device.index or 0]
        cc = f"compute capability {gpu.capability[0]}.{gpu.capability[1]}"
        if tuple(gpu.capability) >= MIN_CUDA_CAPABILITY:
            return cc, ""
        return "", f"{cc} < {MIN_CUDA_CAPABILITY[0]}.{MIN_CUDA_CAPABILITY[1]}"
    have = [f for f in NATIVE_CPU_FLAGS if f in caps.cpu_flags]
    if have:
        return have[0], ""
    return "", f"CPU flags lack {' and '.join(NATIVE_CPU_FLAGS)}"


def device_name(device: torch.device, caps: Capabilities) -> str:
    return caps.gpus[device.index or 0].name if device.type == "cuda" else caps.cpu_name


def resolve_device(name: str, caps: Capabilities, world: World = World(), key: str = "train.device") -> torch.device:
    """auto -> cuda when a GPU is visible, else cpu; cuda without (enough) GPUs is refused. A rank of a CUDA
    job takes cuda:LOCAL_RANK."""
    if name not in DEVICES:
        raise ComputeError(f"{key} = {name!r} is not allowed: must be one of {', '.join(DEVICES)}")
    if name == "auto":
        name = "cuda" if caps.gpus else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not caps.gpus:
        raise ComputeError(f"{key} = 'cuda' but no CUDA GPU is visible on this machine ({caps.cpu_name}); "
                           f"use 'auto' or 'cpu'")
    if world.local_rank >= len(caps.gpus):
        raise ComputeError(f"{key} = 'cuda' with {world.world_size} processes per node needs {world.world_size} "
                           f"GPUs, and {len(caps.gpus)} are visible (CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return torch.device("cuda", world.local_rank)


def resolve_precision(setting: str, device: torch.device, caps: Capabilities, key: str = "train.precision",
                      emulate: bool = False) -> Precision:
    """auto -> bf16 where native, else fp32; bf16 where not native is refused (unless `emulate`: benchmarks)."""
    if setting not in PRECISIONS:
        raise ComputeError(f"{key} = {setting!r} is not allowed: must be one of {', '.join(PRECISIONS)}")
    native, lacks = bf16_support(device, caps)
    if setting == "auto":
        return "bf16" if native else "fp32"
    if setting == "bf16" and not native and not emulate:
        where = f"{device} ({device_name(device, caps)})"
        raise ComputeError(f"{key} = 'bf16' is refused on {where}: bf16 is not native there ({lacks}; emulated "
                           f"bf16 runs several times slower than fp32); use 'auto' (fp32 here) or 'fp32'")
    return setting  # type: ignore[return-value]


_DETECTED: Capabilities | None = None


def detected() -> Capabilities:
    """This machine's capabilities, detected once per process."""
    global _DETECTED
    if _DETECTED is None:
        _DETECTED = Capabilities.detect()
    return _DETECTED


def resolve(device: str = "auto", precision: str = "auto", caps: Capabilities | None = None,
            world: World | None = None, section: str = "train", emulate: bool = False) -> Compute:
    """The one decision: device, precision and world for `section`'s settings (`train` or `sample`, named in
    errors as `section.device` / `section.precision`). `world` defaults to torchrun's environment."""
    caps = detected() if caps is None else caps
    device_type = "cuda" if device == "cuda" or (device == "auto" and caps.gpus) else "cpu"
    world = World.from_env(device_type) if world is None else world
    dev = resolve_device(device, caps, world, "train.device")
    prec = resolve_precision(precision, dev, caps, f"{section}.precision", emulate)
    native, lacks = bf16_support(dev, caps)
    return Compute(dev, prec, device_name(dev, caps), native, lacks, world, emulated=prec == "bf16" and not native)


def describe_machine(caps: Capabilities | None = None) -> Iterator[str]:
    """Lines for reports: the CPU (and its bf16 capability) and each GPU."""
    caps = detected() if caps is None else caps
    native, lacks = bf16_support(torch.device("cpu"), caps)
    yield f"CPU: {caps.cpu_name}, {os.cpu_count()} logical cores; native bf16: {native or 'no (' + lacks + ')'}"
    for i, gpu in enumerate(caps.gpus):
        native, lacks = bf16_support(torch.device("cuda", i), caps)
        yield f"GPU {i}: {gpu.name}; native bf16: {native or 'no (' + lacks + ')'}"
