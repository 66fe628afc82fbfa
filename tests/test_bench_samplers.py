"""benchmarks/bench_samplers.py in its --tiny smoke mode: a digits model trained in the test, every sampler at
a few network evaluations, the paired differences against DDIM-30 and the files it writes."""

import importlib.util
import json

import pytest

from project import ROOT

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_tiny_benchmark_writes_table_plot_and_goal(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_samplers", ROOT / "benchmarks" / "bench_samplers.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    summary = bench.main(["--tiny", "--threads", "1", "--steps", "5", "10", "--out", str(tmp_path),
                          "--work", str(tmp_path / "work")])
    res = summary["results"]
    assert set(res) == {"ddim-30", "ancestral-5", "ancestral-10", "ddim-5", "ddim-10", "dpm2m-5", "dpm2m-10"}
    base = res["ddim-30"]
    assert "minus_baseline" not in base and base["n"] == 40
    for key, r in res.items():
        assert r["fid_proxy_ci_low"] <= r["fid_proxy"] <= r["fid_proxy_ci_high"] and r["seconds"] > 0, key
        if key != "ddim-30":  # paired on the same reference: the point estimate is the plain difference
            assert r["minus_baseline"] == pytest.approx(r["fid_proxy"] - base["fid_proxy"], abs=1e-9)
            assert r["minus_baseline_ci_low"] <= r["minus_baseline"] <= r["minus_baseline_ci_high"]
    assert res["ddim-10"]["fid_proxy"] != res["dpm2m-10"]["fid_proxy"]  # the samplers really differ
    assert summary["goal"].startswith("Goal: DPM-Solver++ 2M at 10 evaluations minus DDIM at 30: ")
    assert json.loads((tmp_path / "samplers_tiny.json").read_text())["goal"] == summary["goal"]
    md = (tmp_path / "samplers_tiny.md").read_text()
    assert "| DPM-Solver++ 2M | 10 |" in md and summary["goal"] in md and "bench_samplers.py --tiny" in md
    for name in ("samplers_tiny.png", "samplers_tiny_ddim_30.png", "samplers_tiny_dpm2m_10.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG, name
