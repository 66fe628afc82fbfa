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


@pytest.mark.slow
def test_device_check_tiny_runs_every_section_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    subprocess.run([sys.executable, "benchmarks/device_check.py", "--tiny", "--out", str(out), "--work",
                    str(tmp_path / "work")], cwd=ROOT, check=True, capture_output=True,
                   env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    r = json.loads((out / "device_tiny.json").read_text())
    assert set(r["speed"]) == {"default fp32", "default bf16", "ho_cifar10 fp32", "ho_cifar10 bf16"}
    assert all(v["img_s"] > 0 and v["steps"] == 3 for v in r["speed"].values())
    assert r["sampling"]["sample_img_s"] > 0 and r["sampling"]["elbo_passes_s"] > 0
    assert r["agreement"]["against"] == "cpu" and all(row["within"] for row in r["agreement"]["rows"])
    g = r["long"]
    assert g["steps"] == 20 and g["bpd_ci_low"] < g["bpd"] < g["bpd_ci_high"] and g["fid_proxy"] > 0
    md = (out / "device_tiny.md").read_text()
    assert "compares the CPU with itself" in md and "--tiny" in md


@pytest.mark.slow
def test_bench_featurizer_smoke_trains_each_arm_and_a_setting_twice_gives_the_same_weights(tmp_path):
    out = tmp_path / "out"
    subprocess.run([sys.executable, "benchmarks/bench_featurizer.py", "--smoke", "--threads", "1", "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    r = json.loads((out / "featurizer_smoke.json").read_text())
    arms = r["arms"]
    assert [a["threads"] for a in arms] == [1, 1, 2, 1] and arms[3]["kernels"] == "DEFAULT"
    assert arms[0]["md5"] == arms[1]["md5"] and r["repeat_identical"]  # a setting is deterministic
    assert r["distinct"] == len({a["md5"] for a in arms}) and all(len(a["md5"]) == 32 for a in arms)
    for a in arms:  # a classifier of the digits test split, with its binomial interval
        assert a["dataset"] == "digits" and a["n_test"] > 100
        assert a["accuracy_ci"][0] <= a["accuracy"] <= a["accuracy_ci"][1] and 0.5 < a["accuracy"] <= 1
    md = (out / "featurizer_smoke.md").read_text()
    assert "The same setting twice gives the same weights" in md


def test_ho_cifar10_unet_has_ho_et_al_s_parameter_count():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from device_check import HO_CIFAR10, HO_PARAMS

    from ddpm_core.unet import build_unet

    assert sum(p.numel() for p in build_unet(HO_CIFAR10, 3, 32).parameters()) == HO_PARAMS
    assert round(HO_PARAMS / 1e6, 1) == 35.7


def test_bench_report_threads_times_each_arm_in_its_own_process(tmp_path):
    """Each arm's process has its OPENBLAS_NUM_THREADS; every arm writes n timings with an interval around them."""
    out = tmp_path / "out"
    subprocess.run([sys.executable, "benchmarks/bench_report_threads.py", "--reps", "3", "--out", str(out),
                    "--stem", "smoke"], cwd=ROOT, check=True, capture_output=True,
                   env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    r = json.loads((out / "smoke.json").read_text())
    assert [a["threads"] for a in r["arms"]] == [1, 2]
    for a in r["arms"]:
        assert a["n"] == 3 and 0 < a["median_ms"] and a["ci_low_ms"] <= a["mean_ms"] <= a["ci_high_ms"]
    assert "| 2 | 3 |" in (out / "smoke.md").read_text()


def test_a_benchmark_leaves_its_numbers_as_json_beside_its_table_and_prints_the_table(tmp_path, capsys):
    from benchmarks.report import write_report

    md = write_report(tmp_path / "new" / "dir", "x_smoke", {"ratio": [1.5, 1.2, 1.8]}, "| ratio |\n|---|\n", indent=2)
    assert md == tmp_path / "new" / "dir" / "x_smoke.md" and md.read_text() == "| ratio |\n|---|\n"
    assert json.loads((md.parent / "x_smoke.json").read_text()) == {"ratio": [1.5, 1.2, 1.8]}
    assert capsys.readouterr().out == "| ratio |\n|---|\n\n"
