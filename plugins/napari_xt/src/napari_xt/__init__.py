"""napari plugin for xtpath (placeholder: reader, overlays, run widget and writer land with its issue)."""

__version__ = "0.0.1"
