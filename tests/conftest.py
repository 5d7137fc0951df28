"""Shared fixtures. Keep this small: fixtures used by more than one test file only."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Path to a tiny random Youtu-VL checkpoint (preset ``tiny``, seed 0, bfloat16 on disk, single
    model.safetensors, tied lm_head). Read-only: copy it before modifying files in it."""
    from densert.checkpoint import make_test_checkpoint
    return make_test_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0,
                                dtype="bfloat16")
