"""Training: the loss falls, resume is bit-identical, NaN stops cleanly, EMA follows the weights."""

import os
from pathlib import Path
import signal
import subprocess
import sys
import time

import pytest
import torch

from ddpm_core.checkpoint import load_checkpoint
from ddpm_core.compute import World, resolve
from ddpm_core.schedules import NoiseSchedule
from ddpm_core.train import NonFiniteLossError, ResumeError, TrainConfig, ema_avg_fn, train
from tests.helpers import digits_images, tiny_schedule, tiny_unet

ROOT = Path(__file__).resolve().parents[1]


def cfg(**kw):
    base = dict(steps=30, batch_size=32, lr=2e-3, warmup_steps=5, checkpoint_every=10, log_every=5, seed=3)
    return TrainConfig(**{**base, **kw})


def test_training_on_digits_lowers_the_loss(tmp_path):
    logged = []
    res = train(tiny_unet(), tiny_schedule(), digits_images(), cfg(steps=150, checkpoint_every=1000),
                tmp_path / "ckpt.pt", on_log=lambda s, l, lr: logged.append((s, l, lr)), progress=False)
    assert res.step == 150 and res.losses.shape == (150,)
    assert res.losses[-30:].mean() < 0.6 * res.losses[:10].mean()
    assert [s for s, _, _ in logged] == list(range(5, 151, 5))
    assert logged[0][2] == pytest.approx(2e-3)  # warm-up over, constant after
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["step"] == 150 and ckpt["train_config"]["steps"] == 150


def _params(m):
    return torch.cat([p.detach().flatten() for p in m.state_dict().values() if p.is_floating_point()])


# improved DDPM's setting: learned variance, hybrid loss, importance-sampled t. At T = 30 the sampler is warm
# (10 losses for every t) after about 15 steps, so the kill at step 25 lands in the importance-sampled phase.
LEARNED = dict(variance="learned_range", loss="hybrid", t_sampler="loss_second_moment")
SETTINGS = {"default": ({}, tiny_schedule, None), "learned_hybrid_is": (LEARNED, lambda: NoiseSchedule.named("linear", 30), 2),
            "bf16": ({"precision": "bf16"}, tiny_schedule, None)}
# bf16 resume is checked where this CPU computes bf16 natively (what `auto` would choose); elsewhere the same test
# runs in fp32 ("default") and this one is skipped, since emulated bf16 is not what any run here would use
NATIVE = resolve("cpu", "auto", world=World())
NEEDS_NATIVE_BF16 = pytest.mark.skipif(
    NATIVE.precision != "bf16", reason=f"this CPU ({NATIVE.device_name}) has no native bf16 ({NATIVE.lacks}): "
                                       f"auto resolves fp32 here; the fp32 twin of this test runs")
SETTING_PARAMS = [pytest.param(k, marks=NEEDS_NATIVE_BF16) if k == "bf16" else k for k in SETTINGS]


@pytest.mark.parametrize("setting", SETTING_PARAMS)
def test_resumed_run_is_bit_identical(tmp_path, setting):
    extra, schedule, width = SETTINGS[setting]
    cfg_ = lambda: cfg(**extra)  # noqa: E731
    tiny = lambda seed=0: tiny_unet(seed, out_channels=width)  # noqa: E731
    full = train(tiny(), schedule(), digits_images(), cfg_(), tmp_path / "a.pt", progress=False)

    class Kill(Exception):
        pass

    def kill_at_25(step, loss, lr):
        if step == 25:
            raise Kill  # after the step-20 checkpoint: steps 21..25 are lost and redone

    with pytest.raises(Kill):
        train(tiny(), schedule(), digits_images(), cfg_(), tmp_path / "b.pt", on_log=kill_at_25, progress=False)
    saved = load_checkpoint(tmp_path / "b.pt")
    assert saved["step"] == 20
    if setting == "learned_hybrid_is":  # (bf16's extra is only its precision: uniform t, no counts)
        assert torch.all(saved["t_sampler"]["counts"] == 10)  # resumed in the importance-sampled phase
    resumed = train(tiny(seed=99), schedule(), digits_images(), cfg_(), tmp_path / "b.pt", progress=False)
    assert resumed.resumed_from == 20
    assert torch.equal(_params(full.model), _params(resumed.model))
    assert torch.equal(_params(full.ema_model), _params(resumed.ema_model))
    assert torch.equal(torch.as_tensor(full.losses), torch.as_tensor(resumed.losses))


def test_resume_refuses_other_settings(tmp_path):
    train(tiny_unet(), tiny_schedule(), digits_images(), cfg(steps=10), tmp_path / "c.pt", progress=False)
    with pytest.raises(ValueError, match="lr: 0.002 -> 0.1"):
        train(tiny_unet(), tiny_schedule(), digits_images(), cfg(steps=20, lr=0.1), tmp_path / "c.pt",
              progress=False)
    more = train(tiny_unet(), tiny_schedule(), digits_images(), cfg(steps=20), tmp_path / "c.pt", progress=False)
    assert more.resumed_from == 10 and more.step == 20


@pytest.mark.parametrize("first,then", [("fp32", "bf16"), ("bf16", "fp32")])
def test_resume_under_another_resolved_precision_is_refused(tmp_path, first, then):
    """A run started where bf16 resolved does not continue where fp32 does (or back): one line, no step taken.
    The checkpoint of the bf16 side is written as a bf16 run's would be (its config), without training in bf16."""
    path = tmp_path / "p.pt"
    train(tiny_unet(), tiny_schedule(), digits_images(), cfg(steps=2), path, progress=False)
    ckpt = load_checkpoint(path)
    ckpt["train_config"]["precision"] = first
    torch.save(ckpt, path)
    with pytest.raises(ResumeError) as e:
        train(tiny_unet(), tiny_schedule(), digits_images(), cfg(steps=4, precision=then), path, progress=False)
    assert f"(precision: {first!r} -> {then!r}); the precision is resolved per machine" in str(e.value)
    assert "\n" not in str(e.value) and load_checkpoint(path)["step"] == 2


class NaNAfter(torch.nn.Module):
    def __init__(self, net, after):
        super().__init__()
        self.net, self.after, self.calls = net, after, 0

    def forward(self, x, t):
        self.calls += 1
        out = self.net(x, t)
        return out * float("nan") if self.calls > self.after else out


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    path = tmp_path / "n.pt"
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 13.*last good checkpoint kept"):
        train(NaNAfter(tiny_unet(), 12), tiny_schedule(), digits_images(), cfg(), path, progress=False)
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 10
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_ema_warmup_and_decay():
    ema, p = [torch.zeros(3)], [torch.ones(3)]
    ema_avg_fn(0.999, warmup=True)(ema, p, torch.tensor(0))
    assert ema[0][0].item() == pytest.approx(1 - 0.1)  # d_0 = 1/10
    ema2 = [torch.zeros(3)]
    ema_avg_fn(0.999, warmup=False)(ema2, p, torch.tensor(0))
    assert ema2[0][0].item() == pytest.approx(0.001)


SCRIPT = """
import sys, torch
sys.path.insert(0, {root!r})
from ddpm_core.schedules import NoiseSchedule
from ddpm_core.train import TrainConfig, train
from tests.helpers import digits_images, tiny_unet
torch.set_num_threads(1)  # as tests/conftest.py: no oversubscription beside the other test worker
extra = {extra!r}
cfg = TrainConfig(steps=60, batch_size=32, lr=2e-3, warmup_steps=5, checkpoint_every=3, log_every=1, seed=3,
                  **extra)
net = tiny_unet(out_channels=2 if extra.get("variance") else None)
train(net, NoiseSchedule.named("linear", {T}), digits_images(), cfg, sys.argv[1], progress=False)
"""


@pytest.mark.slow
@pytest.mark.parametrize("extra,T", [({}, 100), (LEARNED, 30), pytest.param({"precision": "bf16"}, 100, marks=NEEDS_NATIVE_BF16)],
                         ids=["default", "learned_hybrid_is", "bf16"])
def test_sigkill_at_any_moment_resumes_bit_identically(tmp_path, extra, T):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(root=str(ROOT), extra=extra, T=T))
    subprocess.run([sys.executable, str(script), str(tmp_path / "full.pt")], check=True)
    path = tmp_path / "killed.pt"
    for delay in (4.0, 4.7, 5.3):  # the interpreter and data load take ~3 s; kills land mid-training
        if path.exists() and load_checkpoint(path)["step"] == 60:
            break
        proc = subprocess.Popen([sys.executable, str(script), str(path)])
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name and p.stat().st_size and False]
    subprocess.run([sys.executable, str(script), str(path)], check=True)
    a, b = load_checkpoint(tmp_path / "full.pt"), load_checkpoint(path)
    assert b["step"] == 60
    for key in ("model", "ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    for k in a["t_sampler"]:
        assert torch.equal(a["t_sampler"][k], b["t_sampler"][k]), k


def test_a_checkpoint_from_before_the_objective_keys_resumes_as_their_defaults():
    from dataclasses import asdict
    from ddpm_core.train import check_compatible

    old = {k: v for k, v in asdict(cfg()).items()
           if k not in ("variance", "loss", "t_sampler", "loss_weighting", "min_snr_gamma")}
    check_compatible(old, asdict(cfg()))
    with pytest.raises(ValueError, match="t_sampler: 'uniform' -> 'loss_second_moment'"):
        check_compatible(old, asdict(cfg(t_sampler="loss_second_moment")))
