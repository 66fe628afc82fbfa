"""The noise predictor eps_theta(x_t, t): the DDPM UNet (Ho et al. appendix B; PixelCNN++ backbone).

Levels at image sizes H, H/2, ... (one per channel multiplier); each level has `num_res_blocks` residual blocks
going down and one more coming up, with self-attention after every block at the sizes listed in
`attention_resolutions`; the middle is res-attn-res. Time enters every residual block through a sinusoidal
embedding and an MLP. Sizes that do not halve evenly (28 -> 14 -> 7 -> 4) are handled by upsampling to the
skip connection's size.

Speed (CPU; benchmarks/bench_unet.py, reports/benchmarks/unet.md). The parameters, their names and the function
are those of the plain layers (nn.Conv2d, nearest upsampling, torch.cat); some are evaluated in a cheaper form
that is equal up to float rounding (tests/test_unet.py checks each against the plain computation, in float64):
- `upsample_conv`: nearest 2x upsampling then a 3x3 conv is one stride-2 transposed conv with a 4x4 kernel built
  from the 3x3 one: 4/9 of the FLOPs and no 4x-sized intermediate (~10% of a 28x28 training step);
- `norm_act_conv` / ResBlock(x, emb, skip): the up path's concatenation [h, skip] is never made; GroupNorm and
  the first conv run per part with parameter slices, the 1x1 skip conv as two accumulating matmuls (~7%);
- `pointwise`: 1x1 convs as batched matmuls (oneDNN runs them at about half speed), with the residual add
  folded into the matmul; `attention`: projections as single GEMMs over [N*HW, C] rows, bmm softmax
  attention at few positions; `conv_in_im2col` / `conv_out_col2im`: the image-channel convs, which oneDNN
  handles poorly, as matmuls (~1-2% each);
- in-place adds on fresh conv outputs (autograd does not keep a conv's output), no dropout call when p = 0.
Tried without gain on the 2-core CPUs here (AVX2, and AVX-512): channels_last (GroupNorm is 2-3x slower there,
eating the saved oneDNN reorders; 0.93x a training step on AVX-512), im2col+GEMM forward for 3x3 convs
(page-faults on its big buffer), a matmul weight gradient, torch.compile (1.03x a step after 137 s of
compiling, on AVX-512), mallopt against page faults (glibc's adaptive mmap threshold already keeps them few).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer t: [N] -> [N, dim] (Transformer positional encoding, as in DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


def pointwise(conv: nn.Conv2d, x: torch.Tensor, residual: torch.Tensor | None = None,
              channels: slice | None = None) -> torch.Tensor:
    """A 1x1 convolution as one batched matmul: [Cout, Cin] @ [N, Cin, HW] (+ bias, or + residual).

    Equals conv(x), or residual + (conv(x) - conv.bias) when `residual` [N, Cout, H, W] is given: the caller
    has then folded the bias into the residual (ResBlock adds it to conv2's bias), and the residual add costs
    nothing extra, being baddbmm's `input` term. `channels` selects the weight's input columns, for x that is
    one part of a channel concatenation. On CPU oneDNN runs 1x1 convolutions at 28x28 at about half of matmul
    speed, forward and backward.
    """
    n, c, h, w = x.shape
    weight = conv.weight.view(conv.out_channels, -1)[:, channels or slice(None)]  # [Cout, c]
    if residual is None:
        base = conv.bias[None, :, None].expand(n, -1, h * w)
    else:
        base = residual.reshape(n, conv.out_channels, h * w)
    out = torch.baddbmm(base, weight[None].expand(n, -1, -1), x.reshape(n, c, h * w))
    return out.view(n, conv.out_channels, h, w)


# Nearest 2x upsampling then a 3x3 conv (padding 1): output row 2i reads input rows i-1 (tap 0) and i (taps 1, 2);
# row 2i+1 reads rows i (taps 0, 1) and i+1 (tap 2). A transposed conv with stride 2, padding 1 and a 4-tap
# kernel K computes row 2i from K[3] x[i-1] + K[1] x[i] and row 2i+1 from K[2] x[i] + K[0] x[i+1]; so
# K = _UP_TAPS @ w along each spatial axis. Rows of _UP_TAPS: the 4 transposed taps; columns: the 3 conv taps.
_UP_TAPS = ((0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0))


def upsample_conv(conv: nn.Conv2d, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """conv(nearest-upsample(x) to `size`) for a 3x3, padding-1 conv: [N, C, h, w] -> [N, Cout, *size].

    When size is exactly (2h, 2w) this runs as one transposed conv at the input resolution (4/9 of the
    FLOPs, and the 4x larger upsampled tensor is never made); otherwise (odd sizes, 7 -> 4 -> 7) the plain way.
    """
    h, w = x.shape[-2:]
    if tuple(size) != (2 * h, 2 * w):
        return conv(F.interpolate(x, size=tuple(size), mode="nearest"))
    taps = torch.tensor(_UP_TAPS, dtype=conv.weight.dtype, device=conv.weight.device)
    kernel = torch.einsum("pr,qs,oirs->iopq", taps, taps, conv.weight)  # [Cin, Cout, 4, 4], transposed layout
    return F.conv_transpose2d(x, kernel, conv.bias, stride=2, padding=1)


def conv_in_im2col(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x) for a 3x3, padding-1 conv with few input channels (the image's): [N, Cin, H, W] -> [N, Cout, H, W].

    On CPU it is im2col (only 9*Cin rows, cheap) and one batched matmul; oneDNN handles Cin = 1 poorly.
    """
    if x.device.type != "cpu":
        return conv(x)
    n, _, h, w = x.shape
    cols = F.unfold(x, 3, padding=1)  # [N, 9*Cin, HW], rows ordered (c, ky, kx) like the flattened weight
    weight = conv.weight.reshape(conv.out_channels, -1)
    out = torch.baddbmm(conv.bias[None, :, None].expand(n, -1, h * w), weight[None].expand(n, -1, -1), cols)
    return out.view(n, conv.out_channels, h, w)


def conv_out_col2im(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x) for a 3x3, padding-1 conv with few output channels (the image's): [N, Cin, H, W] -> [N, Cout, H, W].

    On CPU: one matmul gives each tap's contribution at every pixel, [9*Cout, Cin] @ [N, Cin, HW], and col2im
    (F.fold) sums the 9 shifted contributions. fold scatters col[(o, ky, kx), p] to p + (ky-1, kx-1) while the
    conv gathers x at p + (ky-1, kx-1), hence the flipped taps. oneDNN handles Cout = 1 poorly.
    """
    if x.device.type != "cpu":
        return conv(x)
    n, c, h, w = x.shape
    taps = conv.weight.flip(-1, -2).permute(0, 2, 3, 1).reshape(-1, c)  # [Cout*9, Cin], rows (o, ky, kx)
    cols = torch.bmm(taps[None].expand(n, -1, -1), x.reshape(n, c, h * w))  # [N, Cout*9, HW]
    return F.fold(cols, (h, w), 3, padding=1) + conv.bias[:, None, None]


def group_norm(channels: int) -> nn.GroupNorm:
    """32 groups as in DDPM, fewer for narrow layers (at least 4 channels a group), always a divisor of the
    width, so any `channels` x `channel_mults` works (e.g. 136 channels: 17 groups of 8)."""
    limit = min(32, max(1, channels // 4))
    return nn.GroupNorm(max(g for g in range(1, limit + 1) if channels % g == 0), channels, eps=1e-6)


def parts_slices(parts: Sequence[torch.Tensor]) -> list[slice]:
    """The channel range of each part within cat(parts, dim=1)."""
    out, start = [], 0
    for p in parts:
        out.append(slice(start, start + p.shape[1]))
        start += p.shape[1]
    return out


def norm_act_conv(norm: nn.GroupNorm, conv: nn.Conv2d, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """conv(silu(norm(cat(parts, 1)))) without making the concatenation.

    A conv over concatenated channels is the sum of convs over each part with its slice of the weight, and
    GroupNorm of the concatenation is GroupNorm of each part with its slice of the affine parameters, as long
    as no group straddles two parts (the caller checks). At 28x28 the two smaller convs run faster than the
    one over the concatenation (oneDNN reorders less), and the concat copy is saved.
    """
    group = norm.num_channels // norm.num_groups
    out = None
    for i, (p, sl) in enumerate(zip(parts, parts_slices(parts))):
        a = F.silu(F.group_norm(p, p.shape[1] // group, norm.weight[sl], norm.bias[sl], norm.eps))
        y = F.conv2d(a, conv.weight[:, sl], conv.bias if i == 0 else None, padding=1)
        out = y if out is None else out.add_(y)  # in place on a fresh conv output: not saved by autograd
    return out


class ResBlock(nn.Module):
    """GN-SiLU-conv, + time projection, GN-SiLU-dropout-conv, + skip (1x1 conv when channels change)."""

    def __init__(self, c_in: int, c_out: int, t_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.t_proj = nn.Linear(t_dim, c_out)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, Cx, H, W], t_emb [N, t_dim]; with `skip` [N, Cs, H, W] the block's input is cat([x, skip], 1)."""
        parts = [x] if skip is None else [x, skip]
        group = self.norm1.num_channels // self.norm1.num_groups
        if len(parts) == 2 and x.shape[1] % group != 0:  # a GroupNorm group would straddle x and skip
            parts = [torch.cat(parts, dim=1)]
        # In-place adds only touch fresh conv outputs, which autograd does not keep for the backward pass.
        h = norm_act_conv(self.norm1, self.conv1, parts).add_(self.t_proj(t_emb)[:, :, None, None])
        h = F.silu(self.norm2(h))
        if self.dropout.p > 0.0:
            h = self.dropout(h)
        if not isinstance(self.skip, nn.Conv2d):
            return self.conv2(h).add_(parts[0])
        # skip(x) + conv2(h) with both biases in the conv and the residual add inside the skip's matmuls.
        h = F.conv2d(h, self.conv2.weight, self.conv2.bias + self.skip.bias, padding=1)
        for p, sl in zip(parts, parts_slices(parts)):
            h = pointwise(self.skip, p, residual=h, channels=sl)
        return h


SMALL_ATTENTION = 256  # positions (16x16) up to which attention materialises its [N, HW, HW] weights


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(C)) v for q, k, v [N, L, C] -> [N, L, C].

    For few positions the [N, L, L] weights are small and two bmm with a softmax beat the CPU fused kernel's
    backward (1.6x slower at 7x7); beyond SMALL_ATTENTION positions, F.scaled_dot_product_attention, which
    does not materialise them.
    """
    if q.shape[1] > SMALL_ATTENTION:
        return F.scaled_dot_product_attention(q, k, v)
    weights = torch.softmax(torch.bmm(q, k.transpose(1, 2)).mul_(q.shape[-1] ** -0.5), dim=-1)  # [N, Lq, Lk]
    return torch.bmm(weights, v)


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, residual; q, k, v from one 1x1 projection."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        # Positions as rows, [N*HW, C] (a small copy at attention resolutions): each projection is then one
        # GEMM over the whole batch instead of N thin ones, and q, k, v come out as the [N, HW, C] attention wants.
        rows = self.norm(x).permute(0, 2, 3, 1).reshape(n * h * w, c)
        qkv = torch.addmm(self.qkv.bias, rows, self.qkv.weight.view(3 * c, c).t()).view(n, h * w, 3 * c)
        out = attention(*qkv.split(c, dim=2)).reshape(n * h * w, c)  # [N*HW, C]
        proj = torch.addmm(self.proj.bias, out, self.proj.weight.view(c, c).t())
        return x + proj.view(n, h, w, c).permute(0, 3, 1, 2)


class Level(nn.Module):
    """The residual (and attention) blocks of one resolution; `forward` is not used, the UNet drives them."""

    def __init__(self, chans: Sequence[tuple[int, int]], t_dim: int, dropout: float, attention: bool):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(a, b, t_dim, dropout) for a, b in chans)
        self.attn = nn.ModuleList(AttnBlock(b) if attention else nn.Identity() for _, b in chans)


class UNet(nn.Module):
    def __init__(self, image_channels: int, image_size: int, channels: int, channel_mults: Sequence[int],
                 num_res_blocks: int, attention_resolutions: Sequence[int], dropout: float,
                 out_channels: int | None = None):
        super().__init__()
        t_dim = 4 * channels
        self.channels = channels
        self.t_mlp = nn.Sequential(nn.Linear(channels, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.conv_in = nn.Conv2d(image_channels, channels, 3, padding=1)
        sizes = [image_size]
        for _ in channel_mults[1:]:
            sizes.append((sizes[-1] + 1) // 2)
        widths = [channels * m for m in channel_mults]
        skip_ch, c = [channels], channels
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        for lvl, (w, size) in enumerate(zip(widths, sizes)):
            chans = [(c if i == 0 else w, w) for i in range(num_res_blocks)]
            self.down.append(Level(chans, t_dim, dropout, size in attention_resolutions))
            c = w
            skip_ch += [w] * num_res_blocks
            last = lvl == len(widths) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(w, w, 3, stride=2, padding=1))
            if not last:
                skip_ch.append(w)
        self.mid = Level([(c, c), (c, c)], t_dim, dropout, attention=False)
        self.mid_attn = AttnBlock(c)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for lvl in reversed(range(len(widths))):
            w, size = widths[lvl], sizes[lvl]
            chans = []
            for _ in range(num_res_blocks + 1):
                chans.append((c + skip_ch.pop(), w))
                c = w
            self.up.append(Level(chans, t_dim, dropout, size in attention_resolutions))
            self.upsample.append(nn.Conv2d(w, w, 3, padding=1) if lvl > 0 else nn.Identity())
        self.norm_out = group_norm(c)
        self.conv_out = nn.Conv2d(c, out_channels or image_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: [N, C, H, W] (x_t), t: long [N] of 0-based steps -> [N, out_channels (default C), H, W]."""
        emb = self.t_mlp(timestep_embedding(t, self.channels).to(x.dtype))
        h = conv_in_im2col(self.conv_in, x)
        skips = [h]
        for level, down in zip(self.down, self.downsample):
            for res, attn in zip(level.res, level.attn):
                h = attn(res(h, emb))
                skips.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                skips.append(h)
        h = self.mid.res[1](self.mid_attn(self.mid.res[0](h, emb)), emb)
        for level, up in zip(self.up, self.upsample):
            for res, attn in zip(level.res, level.attn):
                h = attn(res(h, emb, skips.pop()))
            if not isinstance(up, nn.Identity):
                h = upsample_conv(up, h, skips[-1].shape[-2:])
        return conv_out_col2im(self.conv_out, F.silu(self.norm_out(h)))


MODEL_KEYS = ("channels", "channel_mults", "num_res_blocks", "attention_resolutions", "dropout")


def build_unet(model: dict[str, Any], image_channels: int, image_size: int, out_channels: int | None = None) -> UNet:
    """The UNet for the `model` section of params.yaml (attention_resolutions are image sizes, e.g. [7]).

    out_channels defaults to image_channels; a learned variance needs twice that
    (`ddpm_core.diffusion.output_channels(image_channels, variance)`).
    """
    missing = [k for k in MODEL_KEYS if k not in model]
    if missing:
        raise KeyError(f"model config lacks {', '.join(missing)}")
    return UNet(image_channels, image_size, int(model["channels"]), list(model["channel_mults"]),
                int(model["num_res_blocks"]), [int(r) for r in model["attention_resolutions"]],
                float(model["dropout"]), out_channels)
