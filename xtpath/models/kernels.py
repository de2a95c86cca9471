"""Optional mamba-ssm CUDA kernels, imported lazily (only when the kernel path is actually used).

``import xtpath.models`` never imports mamba_ssm; :func:`cuda_selective_scan` imports it on first use.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Callable

from xtpath.errors import InvalidParameterError

__all__ = ["BACKENDS", "INSTALL_HINT", "mamba_ssm_installed", "cuda_selective_scan", "use_cuda_kernel"]

#: Values of ``ContextConfig.backend``.
BACKENDS = ("auto", "torch", "cuda")
INSTALL_HINT = 'pip install --no-build-isolation "xtpath[gpu]"'

_kernel: Callable | None = None


def mamba_ssm_installed() -> bool:
    """Whether the ``mamba_ssm`` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("mamba_ssm") is not None


def cuda_selective_scan() -> Callable:
    """mamba-ssm's fused ``selective_scan_fn`` (imported on first call).

    Raises
    ------
    InvalidParameterError
        If mamba-ssm is not installed; the message names the install command.
    """
    global _kernel
    if _kernel is None:
        try:
            module = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
        except ImportError as exc:  # missing package, or built for another torch/CUDA
            raise InvalidParameterError(
                f"context.backend='cuda' needs the mamba-ssm CUDA kernels, which failed to import ({exc}); "
                f"install them with: {INSTALL_HINT}, or use backend='auto'") from exc
        _kernel = module.selective_scan_fn
    return _kernel


def use_cuda_kernel(backend: str, on_cuda: bool) -> bool:
    """Decide the scan path for a tensor on CUDA (``on_cuda``) under ``ContextConfig.backend``.

    ``"torch"``: never; ``"auto"``: when on CUDA and mamba-ssm is installed; ``"cuda"``: always (raises
    :class:`~xtpath.errors.InvalidParameterError` if the tensors are not on CUDA).
    """
    if backend == "torch":
        return False
    if backend == "cuda":
        if not on_cuda:
            raise InvalidParameterError("context.backend='cuda' runs the mamba-ssm kernels, which need the "
                                        "model and features on a CUDA device; move them with .cuda() or "
                                        "use backend='auto'")
        return True
    return on_cuda and mamba_ssm_installed()
