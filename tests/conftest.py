"""Shared test setup: keep PyTorch to the cores CI has; each test sees only the components it registers."""
import pytest
import torch

from parity import registry

torch.set_num_threads(2)
pytest_plugins = ["pytester"]  # inner pytest sessions (the plugin's tests and the external port's)


@pytest.fixture(autouse=True)
def _registry_per_test():
    """Component files a test registers (``--component-module``, ``use_files``) are gone after it."""
    with registry.scoped():
        yield
