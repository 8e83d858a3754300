"""Trained networks as denoisers: adapters (EDM, VP/diffusers, plain callables), small reference networks in the
style of Kamb & Ganguli (local ResNet, 2-level UNet), and an EDM trainer with checkpoint loading."""

from .adapters import CallableAdapter, EDMAdapter, VPAdapter, vp_alphas_cumprod
from .models import ARCHITECTURES, LocalResNet, SmallUNet, build_model
from .train import TrainResult, load_network, train_network

__all__ = [
    "ARCHITECTURES",
    "CallableAdapter",
    "EDMAdapter",
    "LocalResNet",
    "SmallUNet",
    "TrainResult",
    "VPAdapter",
    "build_model",
    "load_network",
    "train_network",
    "vp_alphas_cumprod",
]
