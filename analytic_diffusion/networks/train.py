"""Train the built-in reference networks (:mod:`.models`) as EDM denoisers, and load them back.

Objective (Karras et al. 2022, "EDM"): D(x; σ) = c_skip·x + c_out·F(c_in·x, c_noise) (see
:class:`~analytic_diffusion.networks.adapters.EDMAdapter`), loss λ(σ)·‖D(x0 + σε; σ) − x0‖² with
λ(σ) = (σ² + σd²)/(σ·σd)², averaged over pixels and the batch; σd = 0.5.

Noise-level sampling. Default ``sigma_sampling="lognormal"``: EDM's ln σ ~ N(P_mean = −1.2, P_std = 1.2), clipped to
[sigma_min, sigma_max], so about 95% of draws fall in σ ≈ 0.03 … 3.3. That is where the loss can still be reduced
(the strokes and shapes of the images). The two ends are cheap: at small σ D ≈ x (c_skip → 1), and at large σ the
ideal D is close to a smooth function of a heavily averaged x (c_skip → 0, F nearly constant); λ(σ) keeps every σ's
loss of order one. An 18-step Karras grid (σ 80 → 0.002) has 7 of its 18 levels in [0.03, 3.3], 8 above (where the
log-normal still draws ~1% of samples above σ = 5) and 3 below. This is EDM's choice for its own short-to-long runs
and is the reason for the default; it was not benchmarked head to head here. "loguniform" (ln σ uniform on
[ln sigma_min, ln sigma_max]) spreads the budget evenly over the whole grid and so trains the high-σ end more, which
may matter for samplers that start at σ = 80 with a network that has seen few such σ.

Everything is seeded: ``torch.manual_seed(seed)`` before the model is built and one CPU ``torch.Generator`` for
batch indices, σ and noise, so the same seed on the same device gives the same weights.

Checkpoints: one ``torch.save``'d dict of plain types and tensors (loadable with ``weights_only=True``):
{format, arch, kwargs, image_shape, sigma_data, label_dim, state_dict, ema, step, steps, dataset, seed,
sigma_range, sigma_sampling, losses, train}. :func:`load_network` rebuilds the model from ``arch`` and ``kwargs``
alone (no optimiser or trainer state).
"""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import time
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, cast

import torch

from .adapters import EDMAdapter
from .models import ARCHITECTURES, LocalResNet, SmallUNet, build_model

if TYPE_CHECKING:
    from ..data import Dataset

__all__ = [
    "CHECKPOINT_FORMAT",
    "SIGMA_SAMPLINGS",
    "TrainResult",
    "load_network",
    "save_checkpoint",
    "train_network",
]

CHECKPOINT_FORMAT = "analytic_diffusion.network/1"
SIGMA_SAMPLINGS = ("lognormal", "loguniform")


@dataclass
class TrainResult:
    """denoiser: an EDMAdapter around the trained model (EMA weights when kept); checkpoints: paths written;
    losses: the training loss per step; model: the raw (non-EMA) model; elapsed_s: training wall time."""

    denoiser: EDMAdapter
    checkpoints: list[str] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    model: torch.nn.Module | None = None
    elapsed_s: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)


def _positive_int(name: str, v: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    return v


def _images_and_labels(
    dataset: Dataset | torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    if torch.is_tensor(dataset):
        x = dataset
        labels, desc = None, f"tensor{tuple(dataset.shape)}"
    elif hasattr(dataset, "images_float"):
        x = dataset.images_float()
        labels, desc = dataset.labels, repr(dataset)
    else:
        raise TypeError(
            f"dataset: expected an analytic_diffusion Dataset or an (N, C, H, W) tensor, got {type(dataset).__name__}"
        )
    if x.dim() != 4 or not x.is_floating_point() or x.shape[0] < 1:
        raise ValueError(f"dataset: expected float images (N, C, H, W), got {tuple(x.shape)} {x.dtype}")
    return x.to(device=device, dtype=torch.float32), labels, desc


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: LocalResNet | SmallUNet,
    ema: LocalResNet | SmallUNet | None,
    step: int,
    meta: dict[str, Any],
) -> str:
    """Write one checkpoint (see the module docstring) atomically; returns the path."""
    ck = dict(meta)
    ck.update(
        format=CHECKPOINT_FORMAT,
        arch=model.arch,
        kwargs=dict(model.kwargs),
        step=int(step),
        state_dict={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        ema=None if ema is None else {k: v.detach().cpu().clone() for k, v in ema.state_dict().items()},
    )
    tmp = str(path) + ".tmp"
    torch.save(ck, tmp)
    os.replace(tmp, path)
    return str(path)


def train_network(
    dataset: Dataset | torch.Tensor,
    *,
    arch: str = "resnet",
    padding: str = "zeros",
    channels: int = 64,
    blocks: int = 8,
    steps: int,
    batch_size: int = 128,
    lr: float = 2e-3,
    warmup: int | None = None,
    lr_decay: str = "cosine",
    ema: float | None = 0.999,
    grad_clip: float | None = 1.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    sigma_sampling: str = "lognormal",
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    P_mean: float = -1.2,
    P_std: float = 1.2,
    sigma_data: float = 0.5,
    class_conditional: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    progress: bool = True,
    callback: Callable[[int, float, torch.nn.Module], object] | None = None,
) -> TrainResult:
    """Train a :class:`~.models.LocalResNet` (``arch="resnet"``) or :class:`~.models.SmallUNet` ("unet") with the
    EDM objective on ``dataset`` (a Dataset or an (N, C, H, W) float tensor in [-1, 1]).

    steps, batch_size:   optimiser steps and images per step (drawn uniformly with replacement).
    lr, warmup:          Adam learning rate, reached linearly over ``warmup`` steps (default min(200, steps//20));
    lr_decay:            "cosine" (to 0.05·lr at the last step) or "constant".
    ema:                 EMA decay of the weights (None: no EMA); the effective decay min(ema, (1+t)/(10+t)) keeps
                         early steps from dominating short runs. The returned denoiser uses the EMA weights.
    grad_clip:           max global gradient norm (None: off).
    sigma_sampling:      "lognormal" (EDM, P_mean/P_std) or "loguniform" on [sigma_min, sigma_max]; see the module
                         docstring for why lognormal is the default.
    class_conditional:   embed the dataset's labels (label_dim = max label + 1).
    model_kwargs:        extra options for the model (norm, groups, emb_dim).
    out_dir:             folder for checkpoints: ``step{N:07d}.pt`` every ``checkpoint_every`` steps and ``net.pt``
                         at the end, plus ``losses.json``.
    callback:            callback(step, loss, model) after every step (step counts from 1).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {', '.join(map(repr, ARCHITECTURES))}; got {arch!r}")
    steps = _positive_int("steps", steps)
    batch_size = _positive_int("batch_size", batch_size)
    if checkpoint_every is not None:
        _positive_int("checkpoint_every", checkpoint_every)
        if out_dir is None:
            raise ValueError("checkpoint_every needs out_dir")
    if sigma_sampling not in SIGMA_SAMPLINGS:
        raise ValueError(
            f"sigma_sampling must be one of {', '.join(map(repr, SIGMA_SAMPLINGS))}; got {sigma_sampling!r}"
        )
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min!r}, {sigma_max!r}")
    if lr_decay not in ("cosine", "constant"):
        raise ValueError(f"lr_decay must be 'cosine' or 'constant', got {lr_decay!r}")
    if ema is not None and not 0 <= ema < 1:
        raise ValueError(f"ema must be in [0, 1) or None, got {ema!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    device = torch.device(device)
    data, labels, desc = _images_and_labels(dataset, device)
    n, image_shape = data.shape[0], tuple(data.shape[1:])
    label_dim = 0
    if class_conditional:
        if labels is None:
            raise ValueError("class_conditional=True needs a dataset with labels")
        labels = torch.as_tensor(labels).long().to(device)
        label_dim = int(labels.max()) + 1
    warmup = min(200, steps // 20) if warmup is None else int(warmup)

    torch.manual_seed(seed)
    kwargs: dict[str, Any] = dict(
        in_channels=image_shape[0],
        channels=channels,
        blocks=blocks,
        padding=padding,
        label_dim=label_dim,
        **(model_kwargs or {}),
    )
    model = build_model(arch, **kwargs).to(device)
    ema_model = copy.deepcopy(model).requires_grad_(False) if ema is not None else None
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    sd = float(sigma_data)
    meta: dict[str, Any] = dict(
        image_shape=list(image_shape),
        sigma_data=sd,
        label_dim=label_dim,
        steps=steps,
        dataset=desc,
        seed=int(seed),
        sigma_range=[float(sigma_min), float(sigma_max)],
        sigma_sampling=sigma_sampling,
        train=dict(
            batch_size=batch_size,
            lr=lr,
            warmup=warmup,
            lr_decay=lr_decay,
            ema=ema,
            grad_clip=grad_clip,
            P_mean=P_mean,
            P_std=P_std,
            device=str(device),
        ),
    )
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)

    def lr_at(step: int) -> float:  # step counts from 0
        f = (step + 1) / warmup if warmup > 0 and step < warmup else 1.0
        if lr_decay == "cosine" and steps > warmup:
            p = max(0.0, (step - warmup) / max(1, steps - warmup))
            f *= 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p))
        return lr * f

    bar: Any = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"train {arch}", unit="step")
    losses: list[float] = []
    checkpoints: list[str] = []
    t0 = time.time()
    model.train()
    for step in range(steps):
        idx = torch.randint(n, (batch_size,), generator=gen)
        if sigma_sampling == "lognormal":
            sigma = (torch.randn(batch_size, generator=gen) * P_std + P_mean).exp()
        else:
            u = torch.rand(batch_size, generator=gen)
            sigma = (math.log(sigma_min) + u * (math.log(sigma_max) - math.log(sigma_min))).exp()
        sigma = sigma.clamp(sigma_min, sigma_max).to(device)
        noise = torch.randn((batch_size, *image_shape), generator=gen).to(device)
        x0 = data[idx.to(device)]
        y = None if label_dim == 0 else cast(torch.Tensor, labels)[idx.to(device)]  # label_dim > 0: labels
        s4 = sigma.view(-1, 1, 1, 1)
        c_skip = sd**2 / (s4**2 + sd**2)
        c_out = s4 * sd / (s4**2 + sd**2).sqrt()
        c_in = 1 / (s4**2 + sd**2).sqrt()
        x = x0 + s4 * noise
        f = model(c_in * x, sigma.log() / 4, y)
        # λ(σ)·‖c_skip·x + c_out·F − x0‖² with λ = 1/c_out² equals ‖F − (x0 − c_skip·x)/c_out‖².
        loss = (f - (x0 - c_skip * x) / c_out).square().mean()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        if ema_model is not None:
            d = min(cast(float, ema), (1 + step) / (10 + step))  # an EMA model exists only with ema
            with torch.no_grad():
                for pe, pm in zip(ema_model.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - d)
                for be, bm in zip(ema_model.buffers(), model.buffers()):
                    be.copy_(bm)
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise FloatingPointError(f"training diverged at step {step + 1} (loss {lv}); try a smaller lr")
        losses.append(lv)
        if bar is not None:
            bar.update(1)
            if step % 10 == 0 or step == steps - 1:
                k = min(50, len(losses))
                bar.set_postfix(loss=f"{sum(losses[-k:]) / k:.4f}")
        if callback is not None:
            callback(step + 1, lv, model)
        if checkpoint_every is not None and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            checkpoints.append(
                save_checkpoint(
                    os.path.join(cast("str | os.PathLike[str]", out_dir), f"step{step + 1:07d}.pt"),  # checked
                    model=model,
                    ema=ema_model,
                    step=step + 1,
                    meta={**meta, "losses": losses},
                )
            )
    if bar is not None:
        bar.close()
    elapsed = time.time() - t0
    meta["elapsed_s"] = elapsed
    if out_dir is not None:
        checkpoints.append(
            save_checkpoint(
                os.path.join(out_dir, "net.pt"), model=model, ema=ema_model, step=steps, meta={**meta, "losses": losses}
            )
        )
        with open(os.path.join(out_dir, "losses.json"), "w") as fh:
            json.dump({"losses": losses, "elapsed_s": elapsed, "steps": steps}, fh)
    model.eval()
    final = ema_model if ema_model is not None else model
    final.eval()
    den = EDMAdapter(final, image_shape, sigma_data=sd, label_dim=0, precondition=True)
    return TrainResult(den, checkpoints, losses, model, elapsed, meta)


def _is_torchscript(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(nm.split("/", 1)[-1].startswith("code/") for nm in names) or any(
        nm.endswith("constants.pkl") for nm in names
    )


def _load_pickle(path: str, device: torch.device) -> Any:
    """torch.save'd pickles first, then plain pickles (NVlabs EDM writes its snapshots with pickle.dump)."""
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as e:
        first = e
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except Exception as e:
        raise ValueError(
            f"{path}: cannot be read as a checkpoint, TorchScript file or pickle ({first}; as a plain pickle: {e})"
        ) from None


def load_network(
    path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    use_ema: bool = True,
    *,
    image_shape: Sequence[int] | None = None,
    precondition: bool = False,
    sigma_data: float = 0.5,
    allow_pickle: bool = False,
    batch_size: int | None = None,
) -> EDMAdapter:
    """Load a network as an :class:`EDMAdapter`.

    * A checkpoint from :func:`train_network` (loaded with ``weights_only=True``): the model is rebuilt from its
      ``arch`` and ``kwargs``; ``use_ema`` picks the EMA weights when the checkpoint has them.
    * A TorchScript file (``torch.jit.save``), or, only with ``allow_pickle=True`` (it runs arbitrary code: trusted
      files only), a pickled ``nn.Module``: wrapped as ``EDMAdapter(net, image_shape, precondition=precondition,
      sigma_data=sigma_data)``; ``image_shape`` is then required and ``precondition=False`` means the module
      returns D(x; σ) itself (EDMPrecond style), True that it is a raw F taking (c_in·x, c_noise).
    * Only with ``allow_pickle=True``: an NVlabs EDM network pickle (``network-snapshot-*.pkl``, a plain pickle of
      ``{'ema': net, ...}``; its classes must be importable, e.g. the EDM repository on sys.path). The net is an
      EDMPrecond: ``image_shape`` and ``label_dim`` come from its ``img_channels`` / ``img_resolution`` /
      ``label_dim`` and it is wrapped with ``precondition=False``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    device = torch.device(device)
    script = _is_torchscript(path)
    ck: Any = None
    first_error: Exception | None = None
    if not script:
        try:
            with warnings.catch_warnings():  # a plain pickle (EDM's snapshots) trips a protocol warning here
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                ck = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # not a plain weights file
            first_error = e
    if isinstance(ck, dict) and ck.get("format") == CHECKPOINT_FORMAT:
        if ck["arch"] not in ARCHITECTURES:
            raise ValueError(f"{path}: unknown architecture {ck['arch']!r}")
        model = build_model(ck["arch"], **ck["kwargs"])
        state = ck["ema"] if use_ema and ck.get("ema") is not None else ck["state_dict"]
        model.load_state_dict(state)
        model.to(device).eval().requires_grad_(False)
        return EDMAdapter(
            model,
            tuple(ck["image_shape"]),
            sigma_data=ck["sigma_data"],
            label_dim=0,
            precondition=True,
            device=device,
            batch_size=batch_size,
        )
    if ck is not None:
        kind = "a state dict" if isinstance(ck, dict) else type(ck).__name__
        raise ValueError(
            f"{path}: holds {kind}, not a train_network checkpoint (no format "
            f"{CHECKPOINT_FORMAT!r}); rebuild the module yourself and wrap it with EDMAdapter"
        )
    net: Any = None
    if script:
        try:
            net = torch.jit.load(path, map_location=device)
        except RuntimeError as e:  # a zip that only looks like TorchScript (torch.jit refuses it; nothing ran)
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{path}: looks like a TorchScript file but torch.jit cannot load it ({reason})") from None
    elif allow_pickle:
        net = _load_pickle(path, device)
        if isinstance(net, dict) and isinstance(net.get("ema"), torch.nn.Module):  # an EDM network pickle
            net = net["ema"].to(device)
            if image_shape is None and hasattr(net, "img_channels") and hasattr(net, "img_resolution"):
                image_shape = (int(net.img_channels), int(net.img_resolution), int(net.img_resolution))
            net.eval()
            return EDMAdapter(
                net,
                image_shape,  # type: ignore[arg-type]  # may still be None: the adapter then raises the error
                sigma_data=float(getattr(net, "sigma_data", sigma_data)),
                label_dim=int(getattr(net, "label_dim", 0) or 0),
                precondition=False,
                device=device,
                batch_size=batch_size,
            )
        if not isinstance(net, torch.nn.Module):
            raise ValueError(
                f"{path}: the pickle holds {type(net).__name__}, not an nn.Module or an EDM {{'ema': net}} dict"
            )
    else:
        raise ValueError(
            f"{path}: not a train_network checkpoint or a TorchScript file ({first_error}). If it is "
            "a pickled nn.Module from a trusted source, pass allow_pickle=True"
        )
    if image_shape is None:
        raise ValueError(f"{path}: a TorchScript/pickled module needs image_shape=(C, H, W)")
    net.eval()
    return EDMAdapter(
        net, image_shape, sigma_data=sigma_data, precondition=precondition, device=device, batch_size=batch_size
    )


def plot_losses(losses: Sequence[float], path: str | os.PathLike[str], *, width: int = 960, height: int = 540) -> str:
    """Loss curve as a PNG (viz.plots.loss_plot): every step's loss in grey, a moving average in blue, log y.
    Returns the path."""
    from ..viz.plots import loss_plot

    loss_plot(path, [float(v) for v in losses], size=(width, height))
    return str(path)
