"""The registry's generator: a pyfunc whose predict draws images, its registered versions and aliases, and
`mlflow models serve` answering over HTTP. A tiny 8x8 UNet with T = 20 in a temporary MLflow store."""

import json
import os
from pathlib import Path
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pandas as pd
import pytest
import torch

from ddpm_core.data import from_model_range
from ddpm_core.sampling import sample
from ddpm_core.schedules import NoiseSchedule
from ddpm_core.serving import load_eps_model, save_eps_model
from pipeline import tracking

from helpers import TINY_MODEL, as_served, tiny_unet

NAME = "ddpm-tiny"
SAMPLING = {"sampler": "ddim", "steps": 5, "eta": 0.0, "order": 2, "clip_x0": True, "batch_size": 4}
SCHEDULE = NoiseSchedule.named("cosine", 20)


def eps_model_file(folder: Path, seed: int) -> Path:
    path = folder / f"eps_model_{seed}.pt"
    meta = {"model": TINY_MODEL, "image_shape": [1, 8, 8], "variance": "fixed_small", "objective": "eps",
            "sampling": SAMPLING, "dataset": "digits"}
    save_eps_model(path, tiny_unet(seed), SCHEDULE, meta)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two registered versions of ddpm-tiny (two networks) in a project store of their own."""
    root = tmp_path_factory.mktemp("registry")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DDPM_PROJECT_ROOT", str(root))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        runs = [tracking.log_run("ddpm", {"train.seed": seed}, {"bpd": bpd, "fid_proxy": fid}, ([1], [0.5]), [],
                                 eps_model_file(root, seed), {"run_name": f"tiny-{seed}"}, NAME,
                                 description=f"tiny network {seed}", model_tags={"bpd": bpd})
                for seed, bpd, fid in ((0, 3.0, 10.0), (1, 2.5, 12.0))]
        mp.setenv("MLFLOW_TRACKING_URI", tracking.tracking_uri())
        yield root, runs


def client():
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking.tracking_uri())


def library_images(seed_net: int, seeds, sampler="ddim", steps=5, eta=0.0, clip_x0=True, order=2) -> np.ndarray:
    net = as_served(tiny_unet(seed_net).eval())  # the server's precision on this machine
    return np.concatenate([from_model_range(sample(net, SCHEDULE, 1, (1, 8, 8), s, sampler, steps, eta,
                                                   clip_x0=clip_x0, progress=False, order=order)).numpy()
                           for s in seeds])


def test_versions_carry_description_tags_and_a_signature_with_params(store):
    _, runs = store
    assert [r["model_version"] for r in runs] == ["1", "2"]
    v = client().get_model_version(NAME, "2")
    assert v.description == "tiny network 1" and v.tags["bpd"] == "2.5" and v.tags["run_name"] == "tiny-1"
    assert v.run_id == runs[1]["run_id"] and "best-fid" in client().get_registered_model(NAME).description
    import mlflow

    info = mlflow.models.get_model_info(f"models:/{NAME}/1")
    params = {p["name"]: (p["type"], p["default"]) for p in json.loads(info.signature.to_dict()["params"])}
    assert params == {"sampler": ("string", "ddim"), "steps": ("long", 5), "eta": ("double", 0.0),
                      "order": ("long", 2), "clip_x0": ("boolean", True)}
    assert info.signature.inputs.input_names() == ["seed"]
    assert json.loads(info.signature.to_dict()["outputs"])[0]["tensor-spec"] == {"dtype": "uint8", "shape": [-1, 1, 8, 8]}


def test_predict_draws_one_image_per_seed_as_the_library_samples(store):
    import mlflow

    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    images = model.predict(pd.DataFrame({"seed": [7, 0, 7, 3, 11]}))
    assert images.shape == (5, 1, 8, 8) and images.dtype == np.uint8
    assert np.array_equal(images[0], images[2]) and not np.array_equal(images[0], images[1])
    assert np.array_equal(images, library_images(0, [7, 0, 7, 3, 11]))  # defaults: ddim, 5 steps, clip
    again = model.predict(pd.DataFrame({"seed": [3]}))
    assert np.array_equal(again[0], images[3])  # deterministic per seed, whatever it is batched with
    ancestral = model.predict(pd.DataFrame({"seed": [3, 4]}), params={"sampler": "ancestral", "steps": 20})
    assert np.array_equal(ancestral, library_images(0, [3, 4], "ancestral", 20))
    eta = model.predict(pd.DataFrame({"seed": [3]}), params={"eta": 1.0, "steps": 10, "clip_x0": False})
    assert np.array_equal(eta, library_images(0, [3], "ddim", 10, 1.0, False))
    dpm = model.predict(pd.DataFrame({"seed": [3, 4]}), params={"sampler": "dpm_solver++", "steps": 6})
    assert np.array_equal(dpm, library_images(0, [3, 4], "dpm_solver++", 6))
    dpm3 = model.predict(pd.DataFrame({"seed": [3]}), params={"sampler": "dpm_solver++", "steps": 8, "order": 3})
    assert np.array_equal(dpm3, library_images(0, [3], "dpm_solver++", 8, order=3))
    sde = model.predict(pd.DataFrame({"seed": [3]}), params={"sampler": "dpm_solver++", "steps": 8, "eta": 1.0})
    assert np.array_equal(sde, library_images(0, [3], "dpm_solver++", 8, 1.0))


@pytest.mark.parametrize("params,rows,message", [
    ({"sampler": "plms"}, [0], r"sampler = 'plms': must be one of ancestral, ddim, dpm_solver\+\+"),
    ({"sampler": "dpm_solver++", "steps": 20}, [0], r"steps = 20: must be an integer in \[2, T - 1 = 19\]"),
    ({"sampler": "dpm_solver++", "eta": 1.5}, [0], r"eta = 1.5 is not allowed with dpm_solver\+\+: must be in"),
    ({"sampler": "dpm_solver++", "order": 3, "eta": 0.5}, [0], "eta = 0.5 is not allowed with order = 3"),
    ({"order": 3}, [0], "order = 3 is not allowed with sampler = 'ddim'"),
    ({"steps": 21}, [0], r"steps = 21: must be an integer in \[2, T = 20\]"),
    ({"steps": 1}, [0], r"steps = 1: must be an integer in \[2, T = 20\]"),
    ({"eta": -1.0}, [0], "eta = -1.0: must be a finite number >= 0"),
    ({"eta": float("inf")}, [0], "eta = inf: must be a finite number >= 0"),
    ({"sampler": "ancestral", "eta": 0.5}, [0], r"eta is a setting of ddim and dpm_solver\+\+"),
    ({}, [-1], r"seed must be an integer in \[0, 4294967296\)"),
    ({}, [], "0 rows: ask for 1 to 1024 images at once"),
])
def test_predict_refuses_bad_requests_naming_what_is_wrong(store, params, rows, message):
    import mlflow
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    with pytest.raises(MlflowException, match=message):
        model.predict(pd.DataFrame({"seed": pd.Series(rows, dtype="int64")}), params=params)


def test_the_eps_network_comes_back_for_python_users(store):
    net, schedule, meta = tracking.load_eps_model(f"models:/{NAME}/2")
    reference = tiny_unet(1)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), reference.state_dict().values()))
    assert np.array_equal(schedule.betas, SCHEDULE.betas) and meta["sampling"] == SAMPLING and not net.training


def test_eps_model_file_refuses_other_checkpoints(tmp_path):
    from ddpm_core.checkpoint import CheckpointError, save_checkpoint

    save_checkpoint({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an eps model"):
        load_eps_model(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="meta lacks sampling"):
        save_eps_model(tmp_path / "x.pt", tiny_unet(), SCHEDULE, {"model": {}, "image_shape": [1, 8, 8],
                                                                  "variance": "fixed_small", "objective": "eps"})


def test_best_aliases_point_at_the_lowest_scores(store):
    _, runs = store
    done = tracking.set_best_aliases({"best-bpd": [(3.0, runs[0]["run_id"]), (2.5, runs[1]["run_id"])],
                                      "best-fid": [(10.0, runs[0]["run_id"]), (12.0, runs[1]["run_id"])],
                                      "best-nothing": [(1.0, "no-such-run")]})
    assert done == {f"{NAME}@best-bpd": "2", f"{NAME}@best-fid": "1"}
    assert str(client().get_model_version_by_alias(NAME, "best-bpd").version) == "2"
    assert str(client().get_model_version_by_alias(NAME, "best-fid").version) == "1"


# --- serving ------------------------------------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_images(store, tmp_path):
    """`mlflow models serve -m models:/NAME@ALIAS --env-manager local` on 127.0.0.1: a POST to /invocations
    gets the images predict draws; a bad param is HTTP 400 with its reason."""
    root, _ = store
    tracking.set_best_aliases({"best-fid": [(1.0, store[1][0]["run_id"])]})
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(), "MLFLOW_DISABLE_TELEMETRY": "true",
           "DO_NOT_TRACK": "true", "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@best-fid",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        end = time.time() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < end, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        url = f"http://127.0.0.1:{port}/invocations"
        status, body = post(url, {"dataframe_split": {"columns": ["seed"], "data": [[7], [0], [7]]},
                                  "params": {"steps": 10}})
        assert status == 200, body
        images = np.asarray(body["predictions"], dtype=np.uint8)
        assert images.shape == (3, 1, 8, 8) and np.array_equal(images[0], images[2])
        assert np.array_equal(images, library_images(0, [7, 0, 7], steps=10))
        status, body = post(url, {"inputs": {"seed": [3]}, "params": {"sampler": "ancestral", "steps": 20}})
        assert status == 200 and np.array_equal(np.asarray(body["predictions"]), library_images(0, [3], "ancestral", 20))
        status, body = post(url, {"inputs": {"seed": [3, 4]}, "params": {"sampler": "dpm_solver++", "steps": 6}})
        assert status == 200 and np.array_equal(np.asarray(body["predictions"]),
                                                library_images(0, [3, 4], "dpm_solver++", 6))
        status, body = post(url, {"inputs": {"seed": [3]}, "params": {"sampler": "plms"}})
        assert status == 400 and "sampler = 'plms': must be one of ancestral, ddim" in body["message"]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
        log.close()


def test_an_oversize_request_is_refused_before_sampling(store, monkeypatch):
    """rows x steps above the limit: refused at once, in one line naming the limit and how to split."""
    import mlflow
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("DDPM_SERVE_MAX_EVALS", "100")
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    start = time.perf_counter()
    with pytest.raises(MlflowException) as err:
        model.predict(pd.DataFrame({"seed": list(range(30))}), params={"steps": 5})
    assert time.perf_counter() - start < 1.0
    assert str(err.value.message) == ("30 rows x 5 steps = 150 network evaluations is above this server's limit of "
                                      "100 per request (DDPM_SERVE_MAX_EVALS); split it into requests of at most "
                                      "20 rows at 5 steps")
    assert model.predict(pd.DataFrame({"seed": list(range(20))}), params={"steps": 5}).shape == (20, 1, 8, 8)


def start_server(cmd: list[str], folder: Path, extra_env: dict[str, str] | None = None):
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(), "MLFLOW_DISABLE_TELEMETRY": "true",
           "DO_NOT_TRACK": "true", "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"],
           **(extra_env or {})}
    log = open(folder / "serve.log", "w")
    proc = subprocess.Popen([*cmd, "-p", str(port)], cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    end = time.time() + 180
    while True:
        assert proc.poll() is None, (folder / "serve.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                if r.status == 200:
                    return proc, f"http://127.0.0.1:{port}/invocations", log
        except OSError:
            pass
        assert time.time() < end, (folder / "serve.log").read_text()[-3000:]
        time.sleep(1)


def stop_server(proc, log) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)
    log.close()


def post_raw(url: str, data: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


BAD_REQUESTS = [  # (body, the one line that comes back)
    (b'{"inputs": {"seed": [1]', r"the body is not JSON \(Expecting ',' delimiter at line 1 column 24\)"),
    (b'[1, 2]', r"the body must be a JSON object"),
    (b'{"inputs": {"seeds": [1]}}', r"input must have a `seed` column: one row per image"),
    (b'{"dataframe_split": {"columns": ["x"], "data": [[1]]}}', r"input must have a `seed` column"),
    (b'{"inputs": {"seed": [-1]}}', r"seed must be an integer in \[0, 4294967296\)"),
    (b'{"inputs": {"seed": [4294967296]}}', r"seed must be an integer in \[0, 4294967296\)"),
    (b'{"dataframe_split": {"columns": ["seed"], "data": [[1.5]]}}', r"seed must be an integer"),
    (b'{"inputs": {"seed": [1]}, "params": {"temperature": 1}}',
     r"unknown param 'temperature': the params are sampler, steps, eta, order, clip_x0"),
    (b'{"inputs": {"seed": [1]}, "params": {"steps": "ten"}}', r"steps = 'ten': must be an integer in \[2, T = 20\]"),
    (b'{"inputs": {"seed": [1]}, "params": {"steps": 2.5}}', r"steps = 2.5: must be an integer"),
    (b'{"inputs": {"seed": [1]}, "params": {"clip_x0": "yes"}}', r"clip_x0 = 'yes': must be true or false"),
    (b'{"inputs": {"seed": [1]}, "params": {"eta": true}}', r"eta = True: must be a finite number >= 0"),
    (b'{"inputs": {"seed": [1]}, "params": [1]}', r"params must be a JSON object"),
    (b'{"inputs": {"seed": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]}, '
     b'"params": {"steps": 5}}', r"21 rows x 5 steps = 105 network evaluations is above this server's limit of 100 "
                                 r"per request \(DDPM_SERVE_MAX_EVALS\); split it into requests of at most 20 rows"),
]


@pytest.mark.slow
def test_the_gated_server_refuses_bad_requests_in_one_line_and_serves_concurrent_clients(store, tmp_path):
    """`python -m pipeline.serve`: each malformed request is HTTP 400 with one line, an oversize one at once;
    8 clients at once get the images the library draws for their seeds, as they would one at a time."""
    from concurrent.futures import ThreadPoolExecutor
    import re

    proc, url, log = start_server([sys.executable, "-m", "pipeline.serve", "-m", f"models:/{NAME}/1"], tmp_path,
                                  {"DDPM_SERVE_MAX_EVALS": "100", "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        for body, message in BAD_REQUESTS:
            start = time.perf_counter()
            status, answer = post_raw(url, body)
            assert status == 400 and answer["error_code"] == "BAD_REQUEST", (body, answer)
            assert "\n" not in answer["message"] and re.match(message, answer["message"]), (body, answer)
            assert time.perf_counter() - start < 10
        requests = [[8 * i + j for j in range(3)] for i in range(8)]
        expected = [library_images(0, seeds) for seeds in requests]
        one_at_a_time = [post(url, {"inputs": {"seed": seeds}}) for seeds in requests]
        with ThreadPoolExecutor(8) as pool:
            at_once = list(pool.map(lambda seeds: post(url, {"inputs": {"seed": seeds}}), requests))
        for (s1, b1), (s2, b2), want in zip(one_at_a_time, at_once, expected):
            assert s1 == s2 == 200
            assert np.array_equal(np.asarray(b1["predictions"], dtype=np.uint8), want)
            assert np.array_equal(np.asarray(b2["predictions"], dtype=np.uint8), want)
    finally:
        stop_server(proc, log)
