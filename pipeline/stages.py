"""The DVC stages: thin commands around ddpm_core, each reading validated params and fixed paths."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpm_core import compute, distributed
from ddpm_core.checkpoint import CheckpointError, load_checkpoint
from ddpm_core.data import DataError, ImageData, from_model_range, load_dataset, to_model_range
from ddpm_core.diffusion import output_channels
from ddpm_core.elbo_mc import BoundEstimate, estimate_bound
from ddpm_core.fid import (FeaturizerConfig, classifier_featurize, fid_features, load_or_train_featurizer,
                           report_from_features)
from ddpm_core.inception import find_weights, inception_featurize
from ddpm_core.sampling import sample as draw_samples
from ddpm_core.schedules import NoiseSchedule
from ddpm_core.serving import save_eps_model
from ddpm_core.train import TrainConfig, TrainResult, train as run_training
from ddpm_core.unet import build_unet

from . import paths, reports, scratch, tracking
from .params import Params, bound_design, library_config, sample_steps

# devices: a checkpoint of N ranks is found by a run of another N, and refused in one line (train.ResumeError)
RESUME_IGNORES = ("steps", "checkpoint_every", "threads", "device", "devices", "log_every")
TRAIN_SECTIONS = ("diffusion", "model", "train")  # the params a training run has from its start


class LaunchError(RuntimeError):
    """The torchrun job of a multi-process train stage failed. `reported`: a rank already printed why."""

    def __init__(self, message: str, reported: bool = False):
        super().__init__(message)
        self.reported = reported


def write_json(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def set_threads(p: Params) -> None:
    if p.train.threads:
        torch.set_num_threads(p.train.threads)


# --- prepare ---------------------------------------------------------------------------------------------
def prepare(p: Params) -> None:
    data = load_dataset(p.data.dataset, p.data.root, p.data.download)
    paths.DATA.parent.mkdir(parents=True, exist_ok=True)
    np.savez(paths.DATA, name=data.name, train_images=data.train_images, train_labels=data.train_labels,
             test_images=data.test_images, test_labels=data.test_labels)
    write_json(paths.DATA_INFO, {"dataset": data.name, "sha256": data.checksum(),
                                 "train": list(data.train_images.shape), "test": list(data.test_images.shape)})
    print(f"prepare: {data.name} train {data.train_images.shape} test {data.test_images.shape}")


@contextlib.contextmanager
def prepared_file(path: Path):
    """A missing or damaged prepared file, also one that does not even load, as one line naming it."""
    try:
        yield
    except FileNotFoundError:
        raise DataError(f"{path} is missing; run `dvc repro prepare`") from None
    except Exception as e:  # zipfile, zlib, numpy and json each fail in their own way on a flipped byte
        reason = f"{type(e).__name__}: {' '.join(str(e).split())}"[:200]
        raise DataError(f"{path} is damaged ({reason}); run `dvc repro prepare`") from None


def load_prepared() -> ImageData:
    """The prepared arrays, checked against the checksum that prepare recorded."""
    with prepared_file(paths.DATA), np.load(paths.DATA) as z:
        data = ImageData(str(z["name"]), z["train_images"], z["train_labels"], z["test_images"], z["test_labels"])
    with prepared_file(paths.DATA_INFO):
        expected = json.loads(paths.DATA_INFO.read_text())["sha256"]
    if data.checksum() != expected:
        raise DataError(f"{paths.DATA} does not match the checksum in {paths.DATA_INFO}; run `dvc repro prepare`")
    return data


# --- featurizer ------------------------------------------------------------------------------------------
def featurizer_config(p: Params) -> FeaturizerConfig:
    return library_config(FeaturizerConfig, p.featurizer)


def featurizer(p: Params) -> None:
    set_threads(p)
    data = load_prepared()
    _, info = load_or_train_featurizer(paths.FEATURIZER, data, featurizer_config(p))
    write_json(paths.FEATURIZER_INFO, info)
    print(f"featurizer: test accuracy {info['accuracy']:.4f}")


# --- train -----------------------------------------------------------------------------------------------
def run_fingerprint(p: Params, data_sha: str) -> str:
    """What a resumable checkpoint must share with this run to be continued."""
    train_cfg = {k: v for k, v in p.train.model_dump().items() if k not in RESUME_IGNORES}
    blob = json.dumps([data_sha, p.diffusion.model_dump(), p.model.model_dump(), train_cfg], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# --- where and how each stage computes: ddpm_core.compute decides, from train.device and the precisions ---
def train_compute(p: Params) -> compute.Compute:
    """The train stage's: this rank of a torchrun job (its environment), or the one process."""
    return compute.resolve(p.train.device, p.train.precision, section="train")


def sample_compute(p: Params) -> compute.Compute:
    """The sample stage's (and the figures'): one process, sample.precision."""
    return compute.resolve(p.train.device, p.sample.precision, world=compute.World(), section="sample")


def eval_compute(p: Params) -> compute.Compute:
    """evaluate's: the bound and the FID-proxy features in fp32 (the network in bf16 moved the default model's
    bound by +0.011 bits/dim, 0.19 standard errors at 2,000 passes: reports/benchmarks/precision_bound.md)."""
    return compute.resolve(p.train.device, "fp32", world=compute.World(), section="evaluate")


def check_compute(p: Params) -> None:
    """What this machine cannot run (bf16 where it is not native, cuda without enough GPUs for train.devices),
    in one line: `check`, and `train` before it starts torchrun. The job's last rank must find its device."""
    n = p.train.devices
    compute.resolve(p.train.device, p.train.precision, world=compute.World(n - 1, n, n - 1), section="train")
    sample_compute(p)


def train_config(p: Params, c: compute.Compute | None = None) -> TrainConfig:
    """The library's config: objective, variance, the train keys, and the precision `c` resolved (by default the
    train stage's resolution on this machine)."""
    c = c or train_compute(p)
    cfg = library_config(TrainConfig, p.diffusion, p.train.model_copy(update={"precision": "fp32"}))
    return dataclasses.replace(cfg, precision=c.precision)


def train(p: Params) -> None:
    """Train (or resume) the network; with train.devices > 1 this command starts itself as that many ranks under
    `torchrun --standalone` (DVC's command stays `python -m pipeline train`)."""
    if p.train.devices > 1 and not distributed.launched():
        check_compute(p)
        tracking.check_reachable()
        status = distributed.relaunch(p.train.devices, ["-m", "pipeline", "train"], p.train.threads)
        if status:  # 2: a rank printed its one-line error; anything else: its traceback or a signal
            raise LaunchError(f"a rank of the {p.train.devices} under torchrun ended with exit status {status}",
                              reported=status == 2)
        return
    c = train_compute(p)
    if c.world.world_size != p.train.devices:
        raise compute.ComputeError(f"train.devices = {p.train.devices} but this torchrun job has "
                                   f"{c.world.world_size} processes")
    with distributed.session(c):
        train_ranks(p, c)


def train_ranks(p: Params, c: compute.Compute) -> None:
    """The train stage in this process, one rank of train.devices; rank 0 alone writes build/model.pt and the
    loss curve, and talks to MLflow."""
    set_threads(p)
    if c.world.is_main:
        tracking.check_reachable()  # an unreachable server must not cost a finished training run
    data = load_prepared()
    meta = {"model": p.model.model_dump(), "diffusion": p.diffusion.model_dump(), "dataset": data.name,
            "data_sha256": data.checksum(), "image_shape": list(data.image_shape), "compute": c.describe()}
    meta["fingerprint"] = run_fingerprint(p, meta["data_sha256"])
    if not c.world.is_main:  # rank 0 reads the checkpoint and broadcasts it; this rank only trains its slice
        run_network(p, meta, data, c, paths.TRAIN_STATE / "unused-by-other-ranks.pt")
        return
    # Scratch checkpoint of this exact configuration under the project root: a killed run resumes from it
    # wherever it runs again, a finished one removes it (pipeline/scratch.py).
    with scratch.claim(meta["fingerprint"]) as state:
        if not state.shared:
            print("train: another process is training this configuration; this one trains on its own from step 0")
        result, run_id = train_tracked(p, meta, data, state, c)
        tmp = paths.MODEL.with_name(paths.MODEL.name + ".tmp")
        shutil.copyfile(state.checkpoint, tmp)
        tmp.replace(paths.MODEL)
        state.remove()
    print(f"train: {c.summary()}")
    if result.resumed_from:
        print(f"train: resumed from step {result.resumed_from}")
    reports.write_csv(paths.TRAIN_CURVE, ["step", "loss"],
                      [(i + 1, f"{v:.6g}") for i, v in enumerate(result.losses.tolist())])
    print(f"train: {result.step} steps; MLflow run {run_id}")


def run_network(p: Params, meta: dict[str, Any], data: ImageData, c: compute.Compute, checkpoint: Path,
                **hooks: Any) -> TrainResult:
    """The network built from train.seed and trained (or resumed from `checkpoint`) on this rank."""
    torch.manual_seed(p.train.seed)
    channels = data.image_shape[0]
    net = build_unet(meta["model"], channels, data.image_shape[1], output_channels(channels, p.diffusion.variance))
    schedule = NoiseSchedule.named(p.diffusion.schedule, p.diffusion.T)
    return run_training(net, schedule, torch.from_numpy(data.train_images), train_config(p, c), checkpoint,
                        c.device, meta, world=c.world, **hooks)


def train_tracked(p: Params, meta: dict[str, Any], data: ImageData, state: scratch.Scratch,
                  c: compute.Compute) -> tuple[TrainResult, str]:
    """The training, live in its MLflow run from the first step: train_loss and lr every train.log_every steps,
    a sample grid at each checkpoint. A resumed training continues its run and its curve."""
    if state.checkpoint.exists():
        with checkpoint_named(state):
            load_checkpoint(state.checkpoint)
    d = p.diffusion
    live = tracking.open_training_run(p.mlflow.experiment, state.record, f"{data.name}-{d.schedule}-T{d.T}",
                                      {k: v for k, v in p.flat().items() if k.split(".")[0] in TRAIN_SECTIONS},
                                      {"data_sha256": meta["data_sha256"], "dataset": data.name})
    meta["mlflow_run_id"] = live.run_id  # evaluate completes this run (see README, "MLflow")
    schedule = NoiseSchedule.named(d.schedule, d.T)
    status = "FAILED"
    try:
        result = run_network(p, meta, data, c, state.checkpoint,
                             on_log=lambda step, loss, lr: live.log(step, {"train_loss": loss, "lr": lr}),
                             on_checkpoint=checkpoint_grid(p, live, schedule, tuple(data.image_shape), c.device))
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracking.end_training_run(live, status)
    return result, live.run_id


@contextlib.contextmanager
def checkpoint_named(state: scratch.Scratch):
    """A scratch checkpoint that does not load, as one line saying how to start over."""
    try:
        yield
    except CheckpointError as e:
        raise CheckpointError(f"{e}; to train this configuration from step 0, remove it with `python -m pipeline "
                              f"checkpoints --remove {state.checkpoint.stem}`") from None


GRID_N, GRID_STEPS = 16, 10  # the sample grid at each checkpoint: DDIM-10 of 16 seeds (measured: README, MLflow)


def checkpoint_grid(p: Params, live: tracking.LiveRun, schedule: NoiseSchedule, shape: tuple[int, int, int],
                    device: torch.device):
    """on_checkpoint: send the queued curve, then a grid of the EMA model's samples as the run's `samples`
    image at that step (seeds 0..15, so grids of one run compare across steps)."""

    def log(step: int, ema: torch.nn.Module) -> None:
        live.flush()
        if step <= live.after_step and step in tracking.image_steps(live, "samples"):
            return  # the run has this step's grid from before the kill (a kill while it was drawn: it has not)
        was_training = ema.training
        ema.eval()
        x = draw_samples(ema, schedule, GRID_N, shape, 0, "ddim", min(GRID_STEPS, schedule.T), 0.0, GRID_N,
                         p.diffusion.variance, p.diffusion.objective, True, device, progress=False)
        ema.train(was_training)
        tracking.log_image(live, reports.grid_image(from_model_range(x).numpy()), "samples", step)

    return log


def load_ema_model(device: torch.device, path: Path = paths.MODEL) -> tuple[torch.nn.Module, dict[str, Any],
                                                                          NoiseSchedule]:
    """The EMA network of train's checkpoint (build/model.pt, or another run's copy), its meta and schedule."""
    try:
        ckpt = load_checkpoint(path, map_location=device)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; run `dvc repro` (DVC restores {path} from its cache or trains it again)") from None
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
    c = sample_compute(p)
    net, meta, schedule = load_ema_model(c.device)
    s = p.sample
    steps = sample_steps(s, schedule.T)
    start = time.perf_counter()
    x = draw_samples(c.network(net), schedule, s.n, tuple(meta["image_shape"]), s.seed, s.sampler, steps,
                     s.eta, s.batch_size, p.diffusion.variance, p.diffusion.objective, s.clip_x0,
                     c.device, order=s.order)
    seconds = time.perf_counter() - start
    images = from_model_range(x).numpy()
    np.savez(paths.SAMPLES, images=images)
    reports.save_grid(images[:64], paths.SAMPLE_GRID)
    write_json(paths.SAMPLE_STATS, {"sample_seconds": seconds, "n": s.n, "sampler": s.sampler, "order": s.order,
                                    "steps": steps, "device": str(c.device), "compute": c.describe()})
    print(f"sample: {s.n} samples in {seconds:.1f} s ({s.sampler}, {steps} network evaluations; {c.summary()})")


# --- evaluate --------------------------------------------------------------------------------------------
def evaluate_bound(p: Params, net: torch.nn.Module, schedule: NoiseSchedule, data: ImageData,
                   device: torch.device) -> tuple[BoundEstimate, float]:
    """The negative ELBO on test images chosen by evaluate.seed (the same images, noise and t draws for every
    run with that seed, so runs compare paired), and the seconds it took."""
    e = p.evaluate
    design = bound_design(e, schedule.T)
    n = min(len(data.test_images), e.bpd_passes // design.passes_per_image())
    pick = np.random.default_rng(e.seed).permutation(len(data.test_images))[:n]
    start = time.perf_counter()
    bound = estimate_bound(net, schedule, to_model_range(data.test_images[pick]).to(device), pick, design,
                           p.diffusion.variance, p.diffusion.objective, e.chunk_size, e.seed,
                           progress=True)
    return bound, time.perf_counter() - start


def inception_weights(p: Params) -> Path | None:
    """The FID Inception weights file when evaluate.fid_features is 'inception' (fetched only with
    data.download: true), else None; MissingWeightsError (one line) when it is not on disk."""
    if p.evaluate.fid_features != "inception":
        return None
    return find_weights(p.evaluate.inception_weights, download=p.data.download)


def evaluate_samples(p: Params, data: ImageData, device: torch.device,
                     weights: Path | None = None) -> tuple[dict[str, Any], float]:
    """FID-proxy and KID-proxy of the samples with their intervals, and with Inception `weights` the standard
    FID and KID (keys fid, kid) on the same samples and reference images; their features are kept for paired
    differences between runs (build/fid_features.npz: gen, test, train; inception_gen, ...). Returns the report
    and the featurizer's accuracy."""
    e = p.evaluate
    feat, info = load_or_train_featurizer(paths.FEATURIZER, data, featurizer_config(p), device, train_missing=False)
    with np.load(paths.SAMPLES) as z:
        samples = torch.from_numpy(z["images"])
    features = fid_features(classifier_featurize(feat), samples, data, e.n_fid, seed=e.seed)
    arrays = {"gen": features.gen, "test": features.test, "train": features.train}
    report = report_from_features(features, e.seed, e.fid_bootstrap)
    if weights is not None:
        standard = fid_features(inception_featurize(weights, device), samples, data, e.n_fid, seed=e.seed)
        arrays |= {"inception_gen": standard.gen, "inception_test": standard.test, "inception_train": standard.train}
        report |= report_from_features(standard, e.seed, e.fid_bootstrap, fid_key="fid", kid_key="kid")
    np.savez(paths.FID_FEATURES, **{k: v.astype(np.float32) for k, v in arrays.items()})
    return report, info["accuracy"]


def evaluate(p: Params) -> None:
    set_threads(p)
    device = eval_compute(p).device
    weights = inception_weights(p)  # before the long bound: a missing file stops evaluate at once
    net, meta, schedule = load_ema_model(device)
    data = load_prepared()
    bound, bpd_seconds = evaluate_bound(p, net, schedule, data, device)
    fid, accuracy = evaluate_samples(p, data, device, weights)
    losses = reports.read_csv_columns(paths.TRAIN_CURVE)
    sample_stats = json.loads(paths.SAMPLE_STATS.read_text())
    ran = what_ran(meta, sample_stats)
    metrics = {**bound.total.as_dict("bpd"), "prior_bpd": bound.prior_bpd, "decoder_bpd": bound.decoder_bpd,
               **bound.last_term_estimate().as_dict("bpd_last_term"),  # t = T, exact, on the bound's draws
               **bound.without_last_term().as_dict("bpd_without_last_term"),
               "n_bpd": len(bound.per_image), "bpd_network_passes": bound.network_passes,
               "bpd_exact_t": bound.design.exact_t, "bpd_draws": bound.design.draws, "bpd_seconds": bpd_seconds,
               **fid, "classifier_accuracy": accuracy, "sample_steps": sample_stats["steps"],
               "sample_seconds": sample_stats["sample_seconds"],
               "final_train_loss": float(losses["loss"][-max(1, len(losses["loss"]) // 20):].mean()),
               **ran}
    write_reports(p, metrics, bound, losses)
    run = log_to_mlflow(p, net, schedule, meta, metrics, losses, ran)
    write_json(paths.MLFLOW_RUN, run)
    print(f"evaluate: bpd {metrics['bpd']:.3f} (95% CI {metrics['bpd_ci_low']:.3f} to {metrics['bpd_ci_high']:.3f}, "
          f"{metrics['n_bpd']} images), fid_proxy {metrics['fid_proxy']:.3f} (95% CI {metrics['fid_proxy_ci_low']:.3f}"
          f" to {metrics['fid_proxy_ci_high']:.3f}; floor {metrics['fid_proxy_floor']:.3f})"
          + (f", fid {metrics['fid']:.2f} (95% CI {metrics['fid_ci_low']:.2f} to {metrics['fid_ci_high']:.2f}; "
             f"Inception {weights})" if weights else "") + f"; MLflow run {run['run_id']}")


def what_ran(meta: dict[str, Any], sample_stats: dict[str, Any]) -> dict[str, Any]:
    """How the network was trained and sampled (compute.describe() of each stage, recorded by it) and how the
    bound was computed: metrics.json's and the MLflow tags' record of the machine and precision."""
    unknown = dict.fromkeys(("precision", "device", "device_name", "bf16_native", "backend", "torch"), "unknown")
    trained = {**unknown, "world_size": 1, **meta.get("compute", {})}
    sampled = {**unknown, **sample_stats.get("compute", {})}
    out = {f"train_{k}": v for k, v in trained.items() if k != "torch"}
    return out | {"sample_precision": sampled["precision"], "sample_device_name": sampled["device_name"],
                  "bound_precision": "fp32", "torch_version": trained["torch"]}


def log_to_mlflow(p: Params, net: torch.nn.Module, schedule: NoiseSchedule, meta: dict[str, Any],
                  metrics: dict[str, Any], losses: dict[str, np.ndarray],
                  ran: dict[str, Any] | None = None) -> dict[str, str]:
    """The training run completed (or a new run, see tracking.log_run), with the generator registered as
    ddpm-<dataset> (its description and tags say what it is; `ran`, how it was trained and sampled, becomes tags
    of the run and the version)."""
    d = p.diffusion
    tags = {"data_sha256": meta["data_sha256"], "dataset": meta["dataset"],
            "run_name": f"{meta['dataset']}-{d.schedule}-T{d.T}",
            **{k: str(v) for k, v in (ran or {}).items()}}
    model_tags = {**d.model_dump(), "loss": p.train.loss, "train_steps": p.train.steps,
                  "bpd": f"{metrics['bpd']:.4f}", "fid_proxy": f"{metrics['fid_proxy']:.3f}"}
    with tempfile.TemporaryDirectory() as tmp:
        eps_file = Path(tmp) / "eps_model.pt"
        save_eps_model(eps_file, net, schedule, {**meta, "variance": d.variance, "objective": d.objective,
                                                 "sampling": sampling_defaults(p, schedule.T)})
        return tracking.log_run(
            p.mlflow.experiment, p.flat(), {k: float(v) for k, v in metrics.items() if not isinstance(v, str)},
            (losses["step"].astype(int).tolist(), losses["loss"].tolist()),
            [paths.SAMPLE_GRID, paths.LOSS_PLOT, paths.BPD_PLOT, paths.BPD_PER_T, paths.BPD_PER_IMAGE, paths.SUMMARY,
             paths.TRAIN_CURVE, *paths.FIGURE_FILES],
            eps_file, tags, f"ddpm-{meta['dataset'].replace('_', '-')}" if p.mlflow.register_model else None,
            description=model_description(p, meta, metrics), model_tags=model_tags,
            train_run_id=meta.get("mlflow_run_id"), evaluation=evaluation_key(p))


def evaluation_key(p: Params) -> str:
    """Which evaluation completes a training run: the first one, or a rerun of it with the same params."""
    return hashlib.sha256(json.dumps(p.flat(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def sampling_defaults(p: Params, T: int) -> dict[str, Any]:
    """How the registered generator samples unless a request says otherwise: as the sample stage did."""
    s = p.sample
    return {"sampler": s.sampler, "steps": sample_steps(s, T), "eta": s.eta, "order": s.order,
            "clip_x0": s.clip_x0, "batch_size": s.batch_size, "precision": s.precision}


def model_description(p: Params, meta: dict[str, Any], metrics: dict[str, Any]) -> str:
    """The registered version's description: what was trained, how well it scored, and how to call it."""
    d, m, s = p.diffusion, metrics, sampling_defaults(p, p.diffusion.T)
    shape = "x".join(str(v) for v in meta["image_shape"])
    return (f"DDPM generator for {meta['dataset']} ({shape}): {d.schedule} schedule, T = {d.T}, objective "
            f"{d.objective}, variance {d.variance}, loss {p.train.loss}, {p.train.steps} training steps (EMA "
            f"weights). Negative ELBO {m['bpd']:.3f} bits/dim (95% CI {m['bpd_ci_low']:.3f} to "
            f"{m['bpd_ci_high']:.3f}, {m['n_bpd']} test images); FID-proxy {m['fid_proxy']:.2f} (95% CI "
            f"{m['fid_proxy_ci_low']:.2f} to {m['fid_proxy_ci_high']:.2f}, {m['n_fid']} samples). predict: rows "
            f"with a `seed` column -> uint8 images [N, {', '.join(str(v) for v in meta['image_shape'])}], one "
            f"per seed; params sampler, steps, eta, order, clip_x0 (defaults {s['sampler']}, {s['steps']}, "
            f"{s['eta']}, {s['order']}, {str(s['clip_x0']).lower()}). Trained in {m['train_precision']} on "
            f"{m['train_device']} ({m['train_device_name']}; native bf16: {m['train_bf16_native']}; "
            f"{m['train_world_size']} process(es)); sampled in {m['sample_precision']} ({m['sample_device_name']}); "
            f"bound in fp32; torch {m['torch_version']}. Served, it samples in sample.precision = "
            f"{s['precision']!r}, resolved on the serving machine.")


def write_reports(p: Params, metrics: dict[str, Any], bound: BoundEstimate, losses: dict[str, np.ndarray]) -> None:
    write_json(paths.METRICS, metrics)
    reports.write_csv(paths.BPD_PER_T, ["t", "bpd"], [(i + 1, f"{v:.8g}") for i, v in enumerate(bound.terms_bpd)])
    reports.write_csv(paths.BPD_PER_IMAGE, ["image", "phase", "bpd", "last_term"],
                      [(int(i), int(ph), f"{v:.10g}", f"{last:.10g}") for i, ph, v, last in
                       zip(bound.image_ids, bound.phase, bound.per_image, bound.last_term)])
    title = f"{p.data.dataset}, {p.diffusion.schedule} T={p.diffusion.T}"
    reports.plot_bpd_per_t(bound.terms_bpd, paths.BPD_PLOT, f"bits/dim per t ({title}); total {metrics['bpd']:.3f}")
    reports.plot_loss(losses["step"], losses["loss"], paths.LOSS_PLOT, f"training loss ({title})")
    paths.SUMMARY.write_text(reports.summary_markdown(p.flat(), metrics))
