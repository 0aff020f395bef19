"""Where a backbone's modules live: the device, and the precision of the frozen ones."""

from __future__ import annotations

import torch


def precision_dtype(precision: str | None) -> torch.dtype:
    """The dtype of accelerate's mixed precision ``no``, ``fp16`` or ``bf16``."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)


def move_frozen_to(device, dtype: torch.dtype, *modules: torch.nn.Module) -> None:
    """Move modules to ``device``; parameters not being trained go to ``dtype`` (half precision
    under mixed precision), trained ones stay float32, as diffusers' training scripts keep them."""
    for module in modules:
        module.to(device)
        for param in module.parameters():
            if not param.requires_grad:
                param.data = param.data.to(dtype)
