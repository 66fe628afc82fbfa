"""The UNet: shapes, the fast evaluation paths against the plain layers, time conditioning, dropout, gradients.

The reference below computes the network with the plain modules only (nn.Conv2d calls, torch.cat, nearest
F.interpolate then conv, softmax attention written out), so that every cheaper path in ddpm_core/unet.py
(pointwise matmuls, transposed-conv upsampling, split concatenations, im2col/col2im edge convs, bmm attention)
is checked against the straightforward computation, in float64 where the two should agree to ~1e-12.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ddpm_core.unet as unet_mod
from ddpm_core.unet import (AttnBlock, ResBlock, build_unet, conv_in_im2col, conv_out_col2im, norm_act_conv,
                            pointwise, timestep_embedding, upsample_conv)

SMALL = dict(channels=8, channel_mults=[1, 2], num_res_blocks=1, attention_resolutions=[4], dropout=0.0)


def small(image_size: int = 8, image_channels: int = 1, seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return build_unet({**SMALL, **overrides}, image_channels, image_size)


def inputs(n: int, c: int, size: int, dtype: torch.dtype = torch.float32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, size, size, generator=g, dtype=dtype), torch.randint(0, 1000, (n,), generator=g)


# --- the plain reference -------------------------------------------------------------------------------
def ref_res(block: ResBlock, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    h = block.conv1(F.silu(block.norm1(x))) + block.t_proj(emb)[:, :, None, None]
    h = block.conv2(block.dropout(F.silu(block.norm2(h))))
    return block.skip(x) + h


def ref_attn(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(block, nn.Identity):
        return x
    n, c, h, w = x.shape
    qkv = block.qkv(block.norm(x)).reshape(n, 3, c, h * w)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(c), dim=-1)
    return x + block.proj((v @ weights.transpose(1, 2)).reshape(n, c, h, w))


def reference_forward(net: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    emb = net.t_mlp(timestep_embedding(t, net.channels).to(x.dtype))
    h = net.conv_in(x)
    skips = [h]
    for level, down in zip(net.down, net.downsample):
        for res, attn in zip(level.res, level.attn):
            h = ref_attn(attn, ref_res(res, h, emb))
            skips.append(h)
        if not isinstance(down, nn.Identity):
            h = down(h)
            skips.append(h)
    h = ref_res(net.mid.res[1], ref_attn(net.mid_attn, ref_res(net.mid.res[0], h, emb)), emb)
    for level, up in zip(net.up, net.upsample):
        for res, attn in zip(level.res, level.attn):
            h = ref_attn(attn, ref_res(res, torch.cat([h, skips.pop()], dim=1), emb))
        if not isinstance(up, nn.Identity):
            h = up(F.interpolate(h, size=skips[-1].shape[-2:], mode="nearest"))
    return net.conv_out(F.silu(net.norm_out(h)))


def grads(net: nn.Module, out: torch.Tensor, target: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(F.mse_loss(out, target), list(net.parameters())))


def assert_close_lists(a: list[torch.Tensor], b: list[torch.Tensor], rtol: float, atol: float) -> None:
    for i, (p, q) in enumerate(zip(a, b)):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=lambda m: f"tensor {i}: {m}")


# --- shapes -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, mults", [(8, [1, 2]), (28, [1, 2, 2]), (32, [1, 2, 2]), (7, [1, 2, 2]),
                                         (13, [1, 2, 2]), (9, [1, 2])])
def test_output_shape_equals_input_shape(size: int, mults: list[int]) -> None:
    net = small(size, 1, channel_mults=mults, attention_resolutions=[(size + 1) // 2])
    x, t = inputs(2, 1, size)
    assert net(x, t).shape == x.shape


@pytest.mark.parametrize("channels, groups", [(136, 17), (96, 24), (36, 9), (128, 32), (16, 4), (6, 1)])
def test_group_norm_groups_divide_every_width(channels: int, groups: int) -> None:
    assert unet_mod.group_norm(channels).num_groups == groups


def test_width_that_is_not_a_power_of_two_builds_and_runs() -> None:
    x, t = inputs(2, 1, 8)
    assert small(8, 1, channels=36, channel_mults=[1, 2])(x, t).shape == x.shape


def test_rgb_output_shape() -> None:
    x, t = inputs(2, 3, 16)
    assert small(16, 3)(x, t).shape == (2, 3, 16, 16)


def test_base_config_has_ddpm_parameter_count() -> None:
    """The benchmarked config: 1,112,801 parameters, as diffusers' UNet2DModel with the same channels."""
    cfg = dict(channels=32, channel_mults=[1, 2, 2], num_res_blocks=1, attention_resolutions=[7], dropout=0.0)
    assert sum(p.numel() for p in build_unet(cfg, 1, 28).parameters()) == 1_112_801


# --- fast paths equal the plain computation -------------------------------------------------------------------
@pytest.mark.parametrize("size, mults, attn", [(28, [1, 2, 2], [7]), (7, [1, 2, 2], [4]), (12, [1, 2], [12])])
def test_forward_and_gradients_match_plain_reference_float64(size: int, mults: list[int], attn: list[int]) -> None:
    """28: every upsample is exact 2x (transposed-conv path); 7 -> 4 -> 2: the interpolate fallback;
    12 with attention at 12x12 (bmm attention) and 6x6 middle."""
    net = small(size, 1, channel_mults=mults, attention_resolutions=attn).double()
    x, t = inputs(3, 1, size, torch.float64)
    target = torch.randn_like(x)
    out, ref = net(x, t), reference_forward(net, x, t)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert_close_lists(grads(net, out, target), grads(net, ref, target), rtol=1e-9, atol=1e-10)


def test_forward_and_gradients_match_plain_reference_float32() -> None:
    net = small(28, 1, channel_mults=[1, 2, 2], attention_resolutions=[7])
    x, t = inputs(4, 1, 28)
    target = torch.randn_like(x)
    out, ref = net(x, t), reference_forward(net, x, t)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert_close_lists(grads(net, out, target), grads(net, ref, target), rtol=1e-3, atol=1e-5)


def test_pointwise_equals_1x1_conv_with_residual_and_channel_slice() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 5, 1).double()
    x, r = torch.randn(2, 12, 6, 7, dtype=torch.float64), torch.randn(2, 5, 6, 7, dtype=torch.float64)
    torch.testing.assert_close(pointwise(conv, x), conv(x))
    torch.testing.assert_close(pointwise(conv, x, residual=r), r + conv(x) - conv.bias[:, None, None])
    part = pointwise(conv, x[:, 4:], residual=r, channels=slice(4, 12))
    torch.testing.assert_close(part, r + F.conv2d(x[:, 4:], conv.weight[:, 4:]))


@pytest.mark.parametrize("size_in, size_out", [((5, 7), (10, 14)), ((7, 7), (14, 14)), ((4, 4), (7, 7)),
                                               ((3, 5), (5, 9))])
def test_upsample_conv_equals_interpolate_then_conv(size_in: tuple, size_out: tuple) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 4, 3, padding=1).double()
    x = torch.randn(2, 6, *size_in, dtype=torch.float64)
    expected = conv(F.interpolate(x, size=size_out, mode="nearest"))
    torch.testing.assert_close(upsample_conv(conv, x, size_out), expected, rtol=1e-12, atol=1e-12)


def test_norm_act_conv_of_parts_equals_concatenation() -> None:
    torch.manual_seed(0)
    norm, conv = nn.GroupNorm(6, 24).double(), nn.Conv2d(24, 5, 3, padding=1).double()
    nn.init.normal_(norm.weight), nn.init.normal_(norm.bias)
    a, b = torch.randn(2, 16, 6, 6, dtype=torch.float64), torch.randn(2, 8, 6, 6, dtype=torch.float64)
    expected = conv(F.silu(norm(torch.cat([a, b], dim=1))))
    torch.testing.assert_close(norm_act_conv(norm, conv, [a, b]), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("c_in, c_out", [(1, 8), (3, 8)])
def test_edge_convs_equal_conv2d(c_in: int, c_out: int) -> None:
    torch.manual_seed(0)
    first, last = nn.Conv2d(c_in, c_out, 3, padding=1).double(), nn.Conv2d(c_out, c_in, 3, padding=1).double()
    x, h = torch.randn(2, c_in, 9, 6, dtype=torch.float64), torch.randn(2, c_out, 9, 6, dtype=torch.float64)
    torch.testing.assert_close(conv_in_im2col(first, x), first(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conv_out_col2im(last, h), last(h), rtol=1e-12, atol=1e-12)


def test_attention_small_and_sdpa_paths_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    block = AttnBlock(16).double()
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64, requires_grad=True)
    small_out = block(x)
    monkeypatch.setattr(unet_mod, "SMALL_ATTENTION", 0)
    sdpa_out = block(x)
    torch.testing.assert_close(small_out, sdpa_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(small_out, ref_attn(block, x), rtol=1e-12, atol=1e-12)
    g1 = torch.autograd.grad(small_out.square().sum(), [x, *block.parameters()])
    g2 = torch.autograd.grad(sdpa_out.square().sum(), [x, *block.parameters()])
    assert_close_lists(list(g1), list(g2), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("c_h, c_skip", [(16, 8), (128, 64)])
def test_resblock_with_skip_equals_block_on_concatenation(c_h: int, c_skip: int) -> None:
    """(16, 8): GroupNorm(6, 24) groups of 4 split at 16, the split path; (128, 64): GroupNorm(32, 192) groups
    of 6 would straddle channel 128, so the block concatenates (as in the larger benchmark config)."""
    torch.manual_seed(0)
    block = ResBlock(c_h + c_skip, 8, 12, 0.0).double()
    h = torch.randn(2, c_h, 4, 4, dtype=torch.float64, requires_grad=True)
    skip = torch.randn(2, c_skip, 4, 4, dtype=torch.float64, requires_grad=True)
    emb = torch.randn(2, 12, dtype=torch.float64)
    out, expected = block(h, emb, skip), ref_res(block, torch.cat([h, skip], dim=1), emb)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    params = [h, skip, *block.parameters()]
    g1 = torch.autograd.grad(out.square().sum(), params)
    g2 = torch.autograd.grad(expected.square().sum(), params)
    assert_close_lists(list(g1), list(g2), rtol=1e-10, atol=1e-12)


# --- conditioning, dropout, gradients, config ---------------------------------------------------------------
def test_timestep_embedding_is_sinusoidal() -> None:
    emb = timestep_embedding(torch.tensor([0, 5]), 7)
    assert emb.shape == (2, 7)
    torch.testing.assert_close(emb[0, :3], torch.ones(3))  # cos(0)
    torch.testing.assert_close(emb[0, 3:], torch.zeros(4))  # sin(0), then the zero pad
    torch.testing.assert_close(emb[1, 0], torch.cos(torch.tensor(5.0)))


def test_time_conditions_the_output() -> None:
    net = small().eval()
    x, _ = inputs(1, 1, 8)
    x = x.expand(3, -1, -1, -1)
    with torch.no_grad():
        out = net(x, torch.tensor([10, 10, 500]))
    assert torch.equal(out[0], out[1])
    assert (out[0] - out[2]).abs().max() > 1e-4


def test_dropout_is_active_only_in_train_mode() -> None:
    net = small(dropout=0.5)
    x, t = inputs(2, 1, 8)
    with torch.no_grad():
        net.train()
        a, b = net(x, t), net(x, t)
        net.eval()
        c, d = net(x, t), net(x, t)
        ref = reference_forward(net, x, t)
    assert (a - b).abs().max() > 1e-4
    assert torch.equal(c, d)
    torch.testing.assert_close(c, ref, rtol=1e-4, atol=1e-5)


def test_no_dropout_train_mode_is_deterministic() -> None:
    net = small(dropout=0.0).train()
    x, t = inputs(2, 1, 8)
    with torch.no_grad():
        assert torch.equal(net(x, t), net(x, t))


def test_gradients_reach_every_parameter() -> None:
    net = small(12, 1, channel_mults=[1, 2], attention_resolutions=[6])
    x, t = inputs(2, 1, 12)
    F.mse_loss(net(x, t), torch.randn_like(x)).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_input_gradient_flows_through_im2col_path() -> None:
    net = small()
    x, t = inputs(2, 1, 8)
    x.requires_grad_(True)
    (g,) = torch.autograd.grad(net(x, t).sum(), [x])
    xr = x.detach().requires_grad_(True)
    (gr,) = torch.autograd.grad(reference_forward(net, xr, t).sum(), [xr])
    torch.testing.assert_close(g, gr, rtol=1e-4, atol=1e-6)


def test_build_unet_names_missing_keys() -> None:
    with pytest.raises(KeyError, match="num_res_blocks, dropout"):
        build_unet({"channels": 8, "channel_mults": [1], "attention_resolutions": []}, 1, 8)
    with pytest.raises(KeyError, match="channels"):
        build_unet({k: v for k, v in SMALL.items() if k != "channels"}, 1, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    net = small(28, 1, channel_mults=[1, 2, 2], attention_resolutions=[7])
    x, t = inputs(2, 1, 28)
    expected = net(x, t)
    out = net.cuda()(x.cuda(), t.cuda()).cpu()
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-4)


def test_exact_2x_upsampling_skips_interpolate(monkeypatch: pytest.MonkeyPatch) -> None:
    """At 28 (28 -> 14 -> 7) every upsample is an exact 2x, so the transposed-conv path is the one taken."""
    net = small(28, 1, channel_mults=[1, 2, 2], attention_resolutions=[7])
    x, t = inputs(1, 1, 28)

    def no_interpolate(*args, **kwargs):
        raise AssertionError("F.interpolate called on an exact 2x upsample")

    monkeypatch.setattr(unet_mod.F, "interpolate", no_interpolate)
    assert net(x, t).shape == x.shape
