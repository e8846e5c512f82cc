"""Choice between the Triton kernels and the PyTorch path, shared by every public entry point."""

from __future__ import annotations

import os
from typing import Literal

import torch

Backend = Literal["auto", "triton", "torch"]


def resolve_backend(backend: Backend, *tensors: torch.Tensor) -> Literal["triton", "torch"]:
    """``auto`` picks Triton for CUDA tensors and PyTorch otherwise; the others are forced.

    Triton on CPU tensors only works with ``TRITON_INTERPRET=1`` set before the kernel
    modules are imported (the tests do that).
    """
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if not all(t.is_cuda for t in tensors) and not interpreting():
            raise RuntimeError("Triton on CPU tensors needs TRITON_INTERPRET=1")
        return "triton"
    if backend != "auto":
        raise ValueError(f"unknown backend {backend!r}")
    return "triton" if all(t.is_cuda for t in tensors) else "torch"


def interpreting() -> bool:
    """Whether Triton kernels run in the interpreter (which needs fp32 arithmetic for dots)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
