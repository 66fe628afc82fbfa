"""Where and how a run computes (ddpm_core.compute): the precision rule from injected capabilities, the one-line
refusals, what is recorded, and the autocast wrapper."""

import re

import pytest
import torch

from ddpm_core.compute import (Autocast, Capabilities, ComputeError, Gpu, World, detected, read_cpuinfo,
                               resolve)
from tests.helpers import tiny_unet

AVX2 = Capabilities("AMD EPYC 7B13", frozenset({"sse4_2", "avx2", "fma"}))
AVX512 = Capabilities("Intel Xeon Platinum 8375C", frozenset({"avx2", "avx512f", "avx512bw", "avx512_vnni"}))
ZEN4 = Capabilities("AMD EPYC 9R14", frozenset({"avx2", "avx512f", "avx512_bf16"}))
SAPPHIRE = Capabilities("Intel Xeon Platinum 8488C", frozenset({"avx2", "avx512f", "amx_bf16", "amx_tile"}))
A100 = Capabilities("AMD EPYC 7B13", frozenset({"avx2"}), (Gpu("NVIDIA A100-SXM4-40GB", (8, 0)),))
T4 = Capabilities("Intel Xeon", frozenset({"avx2", "avx512f"}), (Gpu("Tesla T4", (7, 5)),))
ONE = World()


@pytest.mark.parametrize("caps,device,precision,native", [
    (AVX2, "cpu", "fp32", ""),                      # no native bf16: fp32
    (AVX512, "cpu", "fp32", ""),                    # AVX-512 without its BF16 extension is not enough
    (ZEN4, "cpu", "bf16", "avx512_bf16"),
    (SAPPHIRE, "cpu", "bf16", "amx_bf16"),
    (A100, "cuda", "bf16", "compute capability 8.0"),
    (T4, "cuda", "fp32", ""),                       # CUDA 7.5
])
def test_auto_resolves_bf16_exactly_where_it_is_native(caps, device, precision, native):
    c = resolve("auto", "auto", caps, ONE)
    assert (c.device.type, c.precision, c.bf16_native) == (device, precision, native)
    assert resolve("auto", "fp32", caps, ONE).precision == "fp32"  # fp32 is always allowed


def test_auto_on_a_gpu_machine_with_device_cpu_follows_the_cpu():
    assert resolve("cpu", "auto", A100, ONE).precision == "fp32"     # the A100 host's CPU is AVX2
    assert resolve("cpu", "auto", Capabilities("x", frozenset({"amx_bf16"}), T4.gpus), ONE).precision == "bf16"


@pytest.mark.parametrize("caps,device,pattern", [
    (AVX2, "auto", r"train.precision = 'bf16' is refused on cpu \(AMD EPYC 7B13\): bf16 is not native there "
                   r"\(CPU flags lack avx512_bf16 and amx_bf16; .*\); use 'auto' \(fp32 here\) or 'fp32'"),
    (T4, "cuda", r"train.precision = 'bf16' is refused on cuda:0 \(Tesla T4\): bf16 is not native there "
                 r"\(compute capability 7.5 < 8.0; .*\); use 'auto' \(fp32 here\) or 'fp32'"),
])
def test_explicit_bf16_without_native_support_is_one_line_naming_device_and_capability(caps, device, pattern):
    with pytest.raises(ComputeError) as e:
        resolve(device, "bf16", caps, ONE)
    assert "\n" not in str(e.value) and re.fullmatch(pattern, str(e.value)), str(e.value)
    assert resolve(device, "bf16", caps, ONE, emulate=True).emulated  # benchmarks may ask for it


def test_sample_precision_is_named_in_its_refusal():
    with pytest.raises(ComputeError, match=r"^sample.precision = 'bf16' is refused on cpu"):
        resolve("cpu", "bf16", AVX2, ONE, section="sample")


def test_cuda_without_enough_gpus_is_refused():
    with pytest.raises(ComputeError, match=r"train.device = 'cuda' but no CUDA GPU is visible on this machine"):
        resolve("cuda", "auto", AVX2, ONE)
    with pytest.raises(ComputeError, match=r"with 2 processes per node needs 2 GPUs, and 1 are visible"):
        resolve("cuda", "auto", A100, World(1, 2, 1, "nccl"))
    assert resolve("cuda", "auto", A100, World(0, 2, 0, "nccl")).device == torch.device("cuda", 0)


def test_describe_tells_two_machines_apart():
    a, b = resolve("auto", "auto", ZEN4, ONE).describe(), resolve("auto", "auto", AVX2, ONE).describe()
    assert a["precision"] == "bf16" and a["bf16_native"] == "avx512_bf16" and a["device_name"] == "AMD EPYC 9R14"
    assert b["precision"] == "fp32" and b["bf16_native"].startswith("no (CPU flags lack")
    assert a != b and a["world_size"] == 1 and a["backend"] == "none"
    assert resolve("auto", "auto", ZEN4, ONE).summary() == \
        "bf16 autocast on cpu (AMD EPYC 9R14, avx512_bf16), 1 process"
    gpu = resolve("auto", "auto", A100, ONE).describe()
    assert (gpu["device"], gpu["device_name"], gpu["bf16_native"]) == ("cuda", "NVIDIA A100-SXM4-40GB",
                                                                       "compute capability 8.0")


def test_cpuinfo_is_read_from_its_first_processor(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9R14 96-Core Processor\nflags\t\t: fpu avx2 avx512_bf16\n\n"
                 "processor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n")
    assert read_cpuinfo(f) == ("AMD EPYC 9R14 96-Core Processor", frozenset({"fpu", "avx2", "avx512_bf16"}))
    assert read_cpuinfo(tmp_path / "missing") == ("unknown CPU", frozenset())


def test_this_machine_is_detected_from_proc_cpuinfo():
    caps = detected()
    flags = set(open("/proc/cpuinfo").read().split())
    assert ("avx512_bf16" in flags or "amx_bf16" in flags) == bool(resolve("cpu", "auto", caps, ONE).bf16_native)


def test_autocast_runs_the_network_in_bf16_and_returns_float32():
    net = tiny_unet().eval()
    x, t = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 10, 50, 99])
    with torch.no_grad():
        full, half = net(x, t), Autocast(net, "cpu")(x, t)
    assert half.dtype == torch.float32 and half.shape == full.shape
    err = (half - full).abs().max().item()
    assert 0 < err < 0.05 * full.abs().max().item()  # bf16 rounding: different, but close
    assert resolve("cpu", "fp32", AVX2, ONE).network(net) is net
    assert isinstance(resolve("cpu", "auto", ZEN4, ONE).network(net), Autocast)


def _params_file(folder, **train):
    import yaml

    from tests.project import ROOT

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["dataset"] = "digits"
    params["train"].update(train)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))


def test_check_stage_refuses_what_this_machine_cannot_run_in_one_line(tmp_path, monkeypatch, capsys):
    """`python -m pipeline check` on this machine: bf16 passes where it is native and is refused in one line
    elsewhere; cuda is refused without a GPU. Both branches are real (no injected capabilities here)."""
    from pipeline.__main__ import main

    monkeypatch.chdir(tmp_path)
    caps = detected()
    native = bool(resolve("auto", "auto", caps, ONE).bf16_native)
    _params_file(tmp_path, precision="bf16")
    assert main(["check"]) == (0 if native else 2)
    err = capsys.readouterr().err
    if not native:
        assert re.fullmatch(r"error: check: train.precision = 'bf16' is refused on cpu \(.+\): bf16 is not native "
                            r"there \(CPU flags lack avx512_bf16 and amx_bf16; [^\n]+\n", err), err
    _params_file(tmp_path, device="cuda")
    assert main(["check"]) == (0 if caps.gpus else 2)
    if not caps.gpus:
        assert capsys.readouterr().err.startswith("error: check: train.device = 'cuda' but no CUDA GPU is visible")
