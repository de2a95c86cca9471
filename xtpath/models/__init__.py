"""xT models on tensors: the selective scan, context encoders, heads, the model, checkpoints.

This package sees tensors and configuration only (no slides, no caches). Importing it imports torch but
never mamba_ssm, which is imported on first use of the CUDA kernel path.

Main entry points
-----------------
selective_scan, selective_scan_ref
    Fast chunked PyTorch selective scan and the plain sequential reference (mamba-ssm's signature).
XTConfig, ContextConfig, HeadConfig, XTModel, ModelOutput
    The model for one slide: ``XTModel(cfg)(features, grid) -> ModelOutput``.
CONTEXT_ENCODERS, build_context_encoder
    Registry of context encoders: ``"mamba"``, ``"transformer"``, ``"abmil"``, ``"mean"``.
save_model, load_model
    safetensors weights + JSON config, no pickle.
stitch_region_masks
    Per-region masks -> one slide mask.
"""

from __future__ import annotations

from xtpath.models.base import ContextEncoder, ContextOutput
from xtpath.models.checkpoint import load_model, read_config, save_model
from xtpath.models.config import ContextConfig, HeadConfig, XTConfig
from xtpath.models.context import CONTEXT_ENCODERS, build_context_encoder, register_context_encoder
from xtpath.models.mamba import Mamba, MambaContext
from xtpath.models.orders import SCAN_ORDERS, scan_orders
from xtpath.models.positions import sincos_2d, token_positions
from xtpath.models.scan import selective_scan, selective_scan_ref
from xtpath.models.stitch import stitch_region_masks
from xtpath.models.xt import ContextFeatures, ModelOutput, XTModel

__all__ = [
    "selective_scan", "selective_scan_ref",
    "ContextConfig", "HeadConfig", "XTConfig", "XTModel", "ModelOutput", "ContextFeatures",
    "CONTEXT_ENCODERS", "build_context_encoder", "register_context_encoder",
    "ContextEncoder", "ContextOutput",
    "Mamba", "MambaContext", "SCAN_ORDERS", "scan_orders", "sincos_2d", "token_positions",
    "save_model", "load_model", "read_config", "stitch_region_masks",
]
