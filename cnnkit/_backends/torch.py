"""PyTorch gradient shim (autograd on a leaf tensor of the feature maps)."""

from __future__ import annotations

import numpy as np
import torch


def gradients(head, features: np.ndarray, class_indices: np.ndarray) -> np.ndarray:
    from keras.src.backend.torch.core import get_device

    x = torch.tensor(features, device=get_device(), requires_grad=True)
    index = torch.as_tensor(class_indices, device=x.device)
    probs = head(x, training=False).float()
    probs.gather(1, index[:, None]).sum().backward()
    return x.grad.detach().cpu().numpy()


def version() -> str:
    return torch.__version__


def devices() -> list[str]:
    return ["cpu:0"] + accelerators()


def accelerators() -> list[str]:
    # Keras' torch backend places tensors on CUDA when torch sees it (MPS is not used for mixed precision).
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def list_devices(count: int | None = None) -> tuple[str, list[str]]:
    """The kind and names of the devices torch sees: its GPUs, else the CPU."""
    if torch.cuda.is_available():
        return "gpu", [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    return "cpu", ["cpu:0"]
