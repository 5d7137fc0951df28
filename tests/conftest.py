"""Shared fixtures. Keep this small: fixtures used by more than one test file only."""
from __future__ import annotations

import os

# Triton reads TRITON_INTERPRET at import time, and any test module may import it first: without
# a GPU, every Triton kernel in the suite runs under the interpreter (bf16-free tiles).
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Engine cache and hash memo in a temp dir: no test writes to the user's ~/.cache/densert."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DENSERT_CACHE_DIR", str(tmp_path_factory.mktemp("densert-cache")))
        yield


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Path to a tiny random Youtu-VL checkpoint (preset ``tiny``, seed 0, bfloat16 on disk, single
    model.safetensors, tied lm_head). Read-only: copy it before modifying files in it."""
    from densert.checkpoint.random_init import make_test_checkpoint
    return make_test_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0,
                                dtype="bfloat16")
