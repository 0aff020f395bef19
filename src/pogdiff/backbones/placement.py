"""Where a backbone's modules live: the device, and the precision of the frozen ones."""

from __future__ import annotations

import torch


def precision_dtype(precision: str | None) -> torch.dtype:
    """The dtype of accelerate's mixed precision ``no``, ``fp16`` or ``bf16``."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)


def move_frozen_to(device, dtype: torch.dtype, *modules: torch.nn.Module) -> None:
    """Move modules to ``device``; parameters not being trained go to ``dtype`` (half precision under mixed
    precision), except those a transformers model keeps in float32 (``_keep_in_fp32_modules``, T5's ``wo``); trained
    ones keep their dtype (float32), as diffusers' training scripts keep them."""
    for module in modules:
        module.to(device)
        kept = set(getattr(module, "_keep_in_fp32_modules", None) or ())
        for name, param in module.named_parameters():
            if not param.requires_grad and not kept.intersection(name.split(".")):
                param.data = param.data.to(dtype)
