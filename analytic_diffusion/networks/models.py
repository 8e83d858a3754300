"""Built-in reference networks: small, dependency-free, in the style of Kamb & Ganguli's "MinimalResNet" and
"MinimalUNet" (no attention).

Both take ``(x, c_noise[, class_labels])`` and return the raw network output F. They are meant to be wrapped by
:class:`~analytic_diffusion.networks.adapters.EDMAdapter` with ``precondition=True`` (D = c_skip·x + c_out·F(c_in·x,
c_noise), c_noise = ln(σ)/4), which is how :func:`~analytic_diffusion.networks.train.train_network` trains them.

Noise conditioning: c_noise (B,) → sinusoidal features → a 2-layer MLP → an embedding added (after a per-block
linear projection) to the activations of every residual block. Class labels (optional, ``label_dim > 0``) are
embedded and added to the same embedding; pass integer labels (B,) or one-hot / soft labels (B, label_dim).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ARCHITECTURES", "LocalResNet", "SmallUNet", "build_model"]

PADDINGS = ("zeros", "circular")
NORMS = ("group", "none")


def _check(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _conv3(cin: int, cout: int, padding: str) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, padding_mode=cast("Literal['zeros', 'circular']", padding))  # PADDINGS


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    g = math.gcd(groups, channels)
    return nn.GroupNorm(g, channels)


class NoiseEmbedding(nn.Module):
    """c_noise (B,) [+ labels] → (B, emb_dim): sinusoidal features of c_noise, then Linear–SiLU–Linear."""

    freqs: torch.Tensor  # non-persistent buffer

    def __init__(self, emb_dim: int = 128, num_freqs: int = 32, label_dim: int = 0) -> None:
        super().__init__()
        # Frequencies 1 ... 1000 (log-spaced): c_noise = ln(σ)/4 spans about [-1.6, 1.1] for σ in [0.002, 80].
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(1000.0), num_freqs)), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * num_freqs, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_dim = int(label_dim)
        self.label = nn.Linear(self.label_dim, emb_dim, bias=False) if self.label_dim > 0 else None

    def forward(self, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        a = c_noise.reshape(-1, 1).to(self.freqs.dtype) * self.freqs
        emb = self.mlp(torch.cat([torch.cos(a), torch.sin(a)], dim=1))
        if class_labels is not None:
            if self.label is None:
                raise ValueError("class_labels given to a network built with label_dim=0 (unconditional)")
            if class_labels.dim() == 1:  # integer class indices
                class_labels = F.one_hot(class_labels.long(), self.label_dim)
            emb = emb + self.label(class_labels.to(emb.dtype))
        return F.silu(emb)


class ResBlock(nn.Module):
    """norm–SiLU–conv3×3, + Linear(emb), norm–SiLU–conv3×3, plus a (1×1 if needed) skip. Two 3×3 convolutions."""

    def __init__(self, cin: int, cout: int, emb_dim: int, padding: str, norm: str, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(norm, cin, groups)
        self.conv1 = _conv3(cin, cout, padding)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = _norm(norm, cout, groups)
        self.conv2 = _conv3(cout, cout, padding)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class LocalResNet(nn.Module):
    """A purely local CNN: 3×3 convolutions only, no down-sampling, no attention.

    Layout: conv3×3 (in) → ``blocks`` residual blocks of two 3×3 convolutions each → norm–SiLU–conv3×3 (out), so
    it has 2·blocks + 2 convolutions of size 3×3 and a receptive field of 2·(2·blocks + 2) + 1 pixels per side
    (8 blocks: 37 px; 4 blocks: 21 px). ``padding`` is "zeros" or "circular" (circular padding makes the network
    exactly equivariant to circular shifts).

    Caveat on locality: with ``norm="group"`` (the default) GroupNorm's mean and variance are taken over the whole
    image, so every output pixel depends weakly on every input pixel through those two statistics per group; the
    convolutional path is still local. ``norm="none"`` gives a strictly local network whose outputs outside the
    receptive field of an input pixel are exactly unchanged when that pixel changes.
    """

    arch = "resnet"

    def __init__(
        self,
        in_channels: int = 1,
        channels: int = 64,
        blocks: int = 8,
        *,
        padding: str = "zeros",
        norm: str = "group",
        groups: int = 8,
        emb_dim: int = 128,
        label_dim: int = 0,
    ) -> None:
        super().__init__()
        _check("padding", padding, PADDINGS)
        _check("norm", norm, NORMS)
        if blocks < 0 or channels < 1 or in_channels < 1:
            raise ValueError(
                f"need in_channels >= 1, channels >= 1, blocks >= 0; got {in_channels}, {channels}, {blocks}"
            )
        self.kwargs = dict(
            in_channels=in_channels,
            channels=channels,
            blocks=blocks,
            padding=padding,
            norm=norm,
            groups=groups,
            emb_dim=emb_dim,
            label_dim=label_dim,
        )
        self.embed = NoiseEmbedding(emb_dim, label_dim=label_dim)
        self.inp = _conv3(in_channels, channels, padding)
        self.blocks = nn.ModuleList(ResBlock(channels, channels, emb_dim, padding, norm, groups) for _ in range(blocks))
        self.out_norm = _norm(norm, channels, groups)
        self.out = _conv3(channels, in_channels, padding)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(cast(torch.Tensor, self.out.bias))  # a Conv2d with bias

    @property
    def num_convs3(self) -> int:
        return 2 * len(self.blocks) + 2

    @property
    def receptive_field(self) -> int:
        """Side of the square input window an output pixel sees through the convolutions: 2·(#3×3 convs) + 1."""
        return 2 * self.num_convs3 + 1

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embed(c_noise, class_labels)
        h = self.inp(x)
        for blk in self.blocks:
            h = blk(h, emb)
        return self.out(F.silu(self.out_norm(h)))

    def config(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            **self.kwargs,
            "receptive_field": self.receptive_field,
            "parameters": sum(p.numel() for p in self.parameters()),
        }


class SmallUNet(nn.Module):
    """A 2-level UNet without attention: ``blocks`` residual blocks at full resolution (``channels``), average-pool
    down to half resolution (2·``channels``, ``blocks`` blocks), nearest up-sampling + conv3×3 back, concatenation
    with the skip, ``blocks`` blocks, conv3×3 out. Image sides must be even. Same noise/label embedding as
    :class:`LocalResNet`. Its receptive field is larger than the ResNet's at equal depth (half-resolution convs count
    double) and it saturates later, as in Kamb & Ganguli."""

    arch = "unet"

    def __init__(
        self,
        in_channels: int = 1,
        channels: int = 64,
        blocks: int = 2,
        *,
        padding: str = "zeros",
        norm: str = "group",
        groups: int = 8,
        emb_dim: int = 128,
        label_dim: int = 0,
    ) -> None:
        super().__init__()
        _check("padding", padding, PADDINGS)
        _check("norm", norm, NORMS)
        if blocks < 1 or channels < 1 or in_channels < 1:
            raise ValueError(
                f"need in_channels >= 1, channels >= 1, blocks >= 1; got {in_channels}, {channels}, {blocks}"
            )
        self.kwargs = dict(
            in_channels=in_channels,
            channels=channels,
            blocks=blocks,
            padding=padding,
            norm=norm,
            groups=groups,
            emb_dim=emb_dim,
            label_dim=label_dim,
        )
        c, c2 = channels, 2 * channels
        blk = lambda i, o: ResBlock(i, o, emb_dim, padding, norm, groups)  # noqa: E731
        self.embed = NoiseEmbedding(emb_dim, label_dim=label_dim)
        self.inp = _conv3(in_channels, c, padding)
        self.enc1 = nn.ModuleList(blk(c, c) for _ in range(blocks))
        self.enc2 = nn.ModuleList(blk(c if i == 0 else c2, c2) for i in range(blocks))
        self.mid = blk(c2, c2)
        self.up = _conv3(c2, c, padding)
        self.dec1 = nn.ModuleList(blk(2 * c if i == 0 else c, c) for i in range(blocks))
        self.out_norm = _norm(norm, c, groups)
        self.out = _conv3(c, in_channels, padding)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(cast(torch.Tensor, self.out.bias))  # a Conv2d with bias

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[-1] % 2 or x.shape[-2] % 2:
            raise ValueError(f"SmallUNet needs even image sides, got {tuple(x.shape[-2:])}")
        emb = self.embed(c_noise, class_labels)
        h = self.inp(x)
        for b in self.enc1:
            h = b(h, emb)
        skip = h
        h = F.avg_pool2d(h, 2)
        for b in self.enc2:
            h = b(h, emb)
        h = self.mid(h, emb)
        h = self.up(F.interpolate(h, scale_factor=2, mode="nearest"))
        h = torch.cat([h, skip], dim=1)
        for b in self.dec1:
            h = b(h, emb)
        return self.out(F.silu(self.out_norm(h)))

    def config(self) -> dict[str, Any]:
        return {"arch": self.arch, **self.kwargs, "parameters": sum(p.numel() for p in self.parameters())}


ARCHITECTURES: dict[str, type[LocalResNet] | type[SmallUNet]] = {"resnet": LocalResNet, "unet": SmallUNet}


def build_model(arch: str, **kwargs: Any) -> LocalResNet | SmallUNet:
    """``build_model("resnet", in_channels=1, channels=64, blocks=8, padding="zeros")``."""
    _check("arch", arch, tuple(ARCHITECTURES))
    return ARCHITECTURES[arch](**kwargs)
