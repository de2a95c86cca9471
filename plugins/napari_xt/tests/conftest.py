"""The plugin tests need an X server with OpenGL: pytest-xvfb starts Xvfb when it is installed."""

import os

import pytest


@pytest.fixture(autouse=True)
def _needs_display():
    if not os.environ.get("DISPLAY"):
        pytest.skip("no X server: install xvfb (apt) and pytest-xvfb to run the napari tests")
