"""The benchmarks' smoke modes run end to end (their real runs are the lead's, on a quiet machine)."""

import json
import subprocess
import sys

import pytest

from ddpm_core.compute import World, resolve
from tests.project import ROOT


@pytest.mark.slow
def test_bench_precision_smoke_measures_both_arms_and_says_whether_bf16_is_native(tmp_path):
    out = tmp_path / "out"
    subprocess.run([sys.executable, "benchmarks/bench_precision.py", "--smoke", "--quality", "--threads", "1",
                    "--out", str(out), "--work", str(tmp_path / "work")], cwd=ROOT, check=True, capture_output=True,
                   env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    report = json.loads((out / "precision_smoke.json").read_text())
    native = resolve("auto", "auto", world=World()).precision == "bf16"
    assert report["emulated"] == (not native) and report["arms"]["bf16"]["precision"] == "bf16"
    md = (out / "precision_smoke.md").read_text()
    assert ("bf16 emulated: no native bf16 on this machine" in md) == (not native)
    for kind in ("train", "sample"):
        assert len(report["speed"]["rounds"]["bf16"][kind]) == 2 and report["speed"][f"{kind}_ratio"]["median"] > 0
    runs = report["quality"]["runs"]
    assert runs["fp32"]["steps"] == runs["bf16"]["steps"] == 6
    assert runs["bf16_equal_time"]["steps"] == report["quality"]["equal_time_steps"] >= 1
    d = runs["bf16"]["vs_fp32"]
    assert d["bpd_diff_ci_low"] <= d["bpd_diff"] <= d["bpd_diff_ci_high"]
    shift = report["bound"]["shift"]
    assert shift["ci_low"] <= shift["mean"] <= shift["ci_high"] and report["bound"]["fp32"]["bpd_stderr"] > 0
