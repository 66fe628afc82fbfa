"""The DVC stages: thin commands around ddpm_core, each reading validated params and fixed paths."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpm_core.checkpoint import load_checkpoint
from ddpm_core.data import DataError, ImageData, from_model_range, load_dataset, to_model_range
from ddpm_core.diffusion import output_channels
from ddpm_core.elbo import nll_bpd
from ddpm_core.fid import FeaturizerConfig, classifier_featurize, fid_proxy_report, load_or_train_featurizer
from ddpm_core.sampling import sample as draw_samples
from ddpm_core.schedules import NoiseSchedule
from ddpm_core.serving import FlatEpsModel
from ddpm_core.train import TrainConfig, resolve_device, train as run_training
from ddpm_core.unet import build_unet

from . import paths, reports, tracking
from .params import Params

RESUME_IGNORES = ("steps", "checkpoint_every", "threads", "device")


def write_json(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def set_threads(p: Params) -> None:
    if p.train["threads"]:
        torch.set_num_threads(p.train["threads"])


# --- prepare ---------------------------------------------------------------------------------------------
def prepare(p: Params) -> None:
    data = load_dataset(p.data["dataset"], p.data["root"], p.data["download"])
    paths.DATA.parent.mkdir(parents=True, exist_ok=True)
    np.savez(paths.DATA, name=data.name, train_images=data.train_images, train_labels=data.train_labels,
             test_images=data.test_images, test_labels=data.test_labels)
    write_json(paths.DATA_INFO, {"dataset": data.name, "sha256": data.checksum(),
                                 "train": list(data.train_images.shape), "test": list(data.test_images.shape)})
    print(f"prepare: {data.name} train {data.train_images.shape} test {data.test_images.shape}")


def load_prepared() -> ImageData:
    """The prepared arrays, checked against the checksum that prepare recorded."""
    try:
        with np.load(paths.DATA) as z:
            data = ImageData(str(z["name"]), z["train_images"], z["train_labels"], z["test_images"], z["test_labels"])
        expected = json.loads(paths.DATA_INFO.read_text())["sha256"]
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"{paths.DATA} or {paths.DATA_INFO} is missing or damaged ({e}); run `dvc repro prepare`") from None
    if data.checksum() != expected:
        raise DataError(f"{paths.DATA} does not match the checksum in {paths.DATA_INFO}; run `dvc repro prepare`")
    return data


# --- featurizer ------------------------------------------------------------------------------------------
def featurizer_config(p: Params) -> FeaturizerConfig:
    return FeaturizerConfig(epochs=p.featurizer["epochs"], seed=p.featurizer["seed"])


def featurizer(p: Params) -> None:
    set_threads(p)
    data = load_prepared()
    _, info = load_or_train_featurizer(paths.FEATURIZER, data, featurizer_config(p))
    write_json(paths.FEATURIZER_INFO, info)
    print(f"featurizer: test accuracy {info['accuracy']:.4f}")


# --- train -----------------------------------------------------------------------------------------------
def run_fingerprint(p: Params, data_sha: str) -> str:
    """What a resumable checkpoint must share with this run to be continued."""
    train_cfg = {k: v for k, v in p.train.items() if k not in RESUME_IGNORES}
    blob = json.dumps([data_sha, p.diffusion, p.model, train_cfg], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def train_config(p: Params) -> TrainConfig:
    t = p.train
    return TrainConfig(steps=t["steps"], batch_size=t["batch_size"], lr=t["lr"], weight_decay=t["weight_decay"],
                       warmup_steps=t["warmup_steps"], grad_clip=t["grad_clip"], ema_decay=t["ema_decay"],
                       ema_warmup=t["ema_warmup"], seed=t["seed"], objective=p.diffusion["objective"],
                       variance=p.diffusion["variance"], loss=t["loss"], t_sampler=t["t_sampler"],
                       loss_weighting=t["loss_weighting"], min_snr_gamma=t["min_snr_gamma"],
                       precision=t["precision"], compile=t["compile"], checkpoint_every=t["checkpoint_every"])


def train(p: Params) -> None:
    set_threads(p)
    device = resolve_device(p.train["device"])
    tracking.check_reachable()  # an unreachable server must not cost a finished training run
    data = load_prepared()
    meta = {"model": p.model, "diffusion": p.diffusion, "dataset": data.name, "data_sha256": data.checksum(),
            "image_shape": list(data.image_shape)}
    meta["fingerprint"] = run_fingerprint(p, meta["data_sha256"])
    # Scratch checkpoint of this exact configuration: a killed run resumes from it, a finished one removes it.
    state = paths.TRAIN_STATE / f"{meta['fingerprint'][:16]}.pt"
    torch.manual_seed(p.train["seed"])
    c = data.image_shape[0]
    net = build_unet(p.model, c, data.image_shape[1], output_channels(c, p.diffusion["variance"]))
    schedule = NoiseSchedule.named(p.diffusion["schedule"], p.diffusion["T"])
    result = run_training(net, schedule, torch.from_numpy(data.train_images), train_config(p), state, device, meta)
    if result.resumed_from:
        print(f"train: resumed from step {result.resumed_from}")
    tmp = paths.MODEL.with_name(paths.MODEL.name + ".tmp")
    shutil.copyfile(state, tmp)
    tmp.replace(paths.MODEL)
    state.unlink()
    reports.write_csv(paths.TRAIN_CURVE, ["step", "loss"],
                      [(i + 1, f"{v:.6g}") for i, v in enumerate(result.losses.tolist())])


def load_ema_model(device: torch.device) -> tuple[torch.nn.Module, dict[str, Any], NoiseSchedule]:
    ckpt = load_checkpoint(paths.MODEL, map_location=device)
    meta = ckpt["meta"]
    shape = meta["image_shape"]
    width = output_channels(shape[0], meta["diffusion"]["variance"])  # 2C for a learned variance
    net = build_unet(meta["model"], shape[0], shape[1], width).to(device)
    net.load_state_dict({k[len("module."):]: v for k, v in ckpt["ema"].items() if k.startswith("module.")})
    net.eval()
    schedule = NoiseSchedule.from_betas(ckpt["schedule_betas"].numpy())
    return net, meta, schedule


# --- sample ----------------------------------------------------------------------------------------------
def sample(p: Params) -> None:
    set_threads(p)
    device = resolve_device(p.train["device"])
    net, meta, schedule = load_ema_model(device)
    s = p.sample
    start = time.perf_counter()
    x = draw_samples(net, schedule, s["n"], tuple(meta["image_shape"]), s["seed"], s["sampler"], s["steps"],
                     s["eta"], s["batch_size"], p.diffusion["variance"], p.diffusion["objective"], s["clip_x0"],
                     device)
    seconds = time.perf_counter() - start
    images = from_model_range(x).numpy()
    np.savez(paths.SAMPLES, images=images)
    reports.save_grid(images[:64], paths.SAMPLE_GRID)
    write_json(paths.SAMPLE_STATS, {"sample_seconds": seconds, "n": s["n"], "sampler": s["sampler"],
                                    "steps": s["steps"], "device": str(device)})
    print(f"sample: {s['n']} samples in {seconds:.1f} s ({s['sampler']}, {s['steps']} steps)")


# --- evaluate --------------------------------------------------------------------------------------------
def evaluate(p: Params) -> None:
    set_threads(p)
    device = resolve_device(p.train["device"])
    net, meta, schedule = load_ema_model(device)
    data = load_prepared()
    e = p.evaluate
    pick = np.random.default_rng(e["seed"]).permutation(len(data.test_images))[: e["n_bpd"]]
    x0 = to_model_range(data.test_images[pick]).to(device)
    gen = torch.Generator(device=device).manual_seed(e["seed"])
    bpd = nll_bpd(net, schedule, x0, p.diffusion["variance"], p.diffusion["objective"], e["chunk_size"], gen,
                  progress=True)
    feat, info = load_or_train_featurizer(paths.FEATURIZER, data, featurizer_config(p), device, train_missing=False)
    with np.load(paths.SAMPLES) as z:
        samples = torch.from_numpy(z["images"])
    fid = fid_proxy_report(classifier_featurize(feat), samples, data, e["n_fid"], seed=e["seed"])
    losses = reports.read_csv_columns(paths.TRAIN_CURVE)
    sample_stats = json.loads(paths.SAMPLE_STATS.read_text())
    metrics = {"bpd": bpd["total_bpd"], "prior_bpd": bpd["prior_bpd"], "decoder_bpd": bpd["decoder_bpd"],
               **{k: v for k, v in fid.items()}, "classifier_accuracy": info["accuracy"], "n_bpd": e["n_bpd"],
               "sample_seconds": sample_stats["sample_seconds"],
               "final_train_loss": float(losses["loss"][-max(1, len(losses["loss"]) // 20):].mean())}
    write_reports(p, metrics, bpd["terms_bpd"], losses)
    run = tracking.log_run(
        p.mlflow["experiment"], p.flat(), {k: float(v) for k, v in metrics.items()},
        (losses["step"].astype(int).tolist(), losses["loss"].tolist()),
        [paths.SAMPLE_GRID, paths.LOSS_PLOT, paths.BPD_PLOT, paths.BPD_PER_T, paths.SUMMARY, paths.TRAIN_CURVE],
        FlatEpsModel(net.cpu(), tuple(meta["image_shape"])),
        {"data_sha256": meta["data_sha256"], "dataset": meta["dataset"],
         "run_name": f"{meta['dataset']}-{p.diffusion['schedule']}-T{p.diffusion['T']}"},
        f"ddpm-{meta['dataset'].replace('_', '-')}" if p.mlflow["register_model"] else None)
    write_json(paths.MLFLOW_RUN, run)
    print(f"evaluate: bpd {metrics['bpd']:.3f}, fid_proxy {metrics['fid_proxy']:.3f} "
          f"(floor {metrics['fid_proxy_floor']:.3f}); MLflow run {run['run_id']}")


def write_reports(p: Params, metrics: dict[str, Any], terms_bpd: np.ndarray, losses: dict[str, np.ndarray]) -> None:
    write_json(paths.METRICS, metrics)
    reports.write_csv(paths.BPD_PER_T, ["t", "bpd"], [(i + 1, f"{v:.8g}") for i, v in enumerate(terms_bpd)])
    title = f"{p.data['dataset']}, {p.diffusion['schedule']} T={p.diffusion['T']}"
    reports.plot_bpd_per_t(terms_bpd, paths.BPD_PLOT, f"bits/dim per t ({title}); total {metrics['bpd']:.3f}")
    reports.plot_loss(losses["step"], losses["loss"], paths.LOSS_PLOT, f"training loss ({title})")
    paths.SUMMARY.write_text(reports.summary_markdown(p.flat(), metrics))
