import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
# Tiny models gain nothing from threads, and on a busy 2-core machine thread hand-offs
# make them ~10x slower; real-model tests are about correctness, not speed.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def real_model():
    """The embedded Gemma 3 270M, loaded once per test session."""
    from specdecode import load_model

    return load_model("default")
