import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def real_model():
    """The embedded Gemma 3 270M, loaded once per test session."""
    from specdecode import load_model

    return load_model("default")
