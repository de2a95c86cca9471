"""Registry of context encoders: name -> class taking a :class:`ContextConfig`."""

from __future__ import annotations

from typing import Callable

from xtpath.errors import InvalidParameterError
from xtpath.models.base import ContextEncoder
from xtpath.models.config import ContextConfig
from xtpath.models.mamba import MambaContext
from xtpath.models.mil import ABMILContext, MeanContext
from xtpath.models.transformer import TransformerContext

__all__ = ["CONTEXT_ENCODERS", "register_context_encoder", "build_context_encoder"]

#: Registered context encoders by name.
CONTEXT_ENCODERS: dict[str, Callable[[ContextConfig], ContextEncoder]] = {
    "mamba": MambaContext,
    "transformer": TransformerContext,
    "abmil": ABMILContext,
    "mean": MeanContext,
}


def register_context_encoder(name: str, factory: Callable[[ContextConfig], ContextEncoder]) -> None:
    """Add a context encoder under ``name`` (``factory(cfg)`` returns a :class:`ContextEncoder`).

    Raises
    ------
    InvalidParameterError
        If ``name`` is already registered.
    """
    if name in CONTEXT_ENCODERS:
        raise InvalidParameterError(f"context encoder {name!r} is already registered; pick another name")
    CONTEXT_ENCODERS[name] = factory


def build_context_encoder(cfg: ContextConfig) -> ContextEncoder:
    """Instantiate the encoder ``cfg.name``.

    Parameters
    ----------
    cfg : ContextConfig
        Settings; ``cfg.name`` picks the encoder.

    Returns
    -------
    ContextEncoder

    Raises
    ------
    InvalidParameterError
        If the name is not registered; the message lists the valid names.
    """
    factory = CONTEXT_ENCODERS.get(cfg.name)
    if factory is None:
        raise InvalidParameterError(f"context.name={cfg.name!r} is not a context encoder; use one of "
                                    f"{sorted(CONTEXT_ENCODERS)}")
    return factory(cfg)
