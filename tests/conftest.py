"""Test harness: compiled kernels on a GPU when there is one, Triton's interpreter on the CPU when not.

``TRITON_INTERPRET=1`` must be set before triton is imported (triton reads it when kernels are
decorated), so this runs first, before any test module imports gpuopt.
"""

import os
import random
import sys

import numpy as np
import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = torch.device("cuda" if HAS_GPU else "cpu")


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (compiled kernels at realistic sizes)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def seed(request):
    """A fresh seed per test (GPUOPT_TEST_SEED pins it); printed, so a failure can be replayed."""
    value = int(os.environ.get("GPUOPT_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)
    print(f"[seed] GPUOPT_TEST_SEED={value}")
    return value
