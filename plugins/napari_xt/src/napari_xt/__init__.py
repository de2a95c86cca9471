"""napari plugin for xtpath: slides as lazy pyramids, xT prediction overlays, a run widget, QuPath export.

All the science (reading slides, scoring, GeoJSON) is xtpath's; this package turns it into napari layers.
"""

import sys

# timm imports torch._dynamo, which imports triton. Loading triton's LLVM after napari has started an OpenGL
# context on Mesa's llvmpipe (software rendering: remote desktops, Xvfb) crashes the process with a segmentation
# fault (two LLVMs in one process; measured with napari 0.9.2, torch 2.14.1). The plugin never compiles GPU
# kernels, so it keeps triton out of napari's process unless something imported it already.
if "triton" not in sys.modules:
    sys.modules["triton"] = None  # type: ignore[assignment]

__version__ = "0.1.0"
