"""Configure, build and ctest the native dense-head tail (C++ CPU, plus CUDA when nvcc exists)."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("c++") is None,
                    reason="cmake / C++ compiler not installed")
def test_cmake_build_and_ctest(tmp_path):
    b = tmp_path / "build"
    for cmd in (["cmake", "-S", str(ROOT), "-B", str(b)], ["cmake", "--build", str(b), "-j2"],
                ["ctest", "--test-dir", str(b), "--output-on-failure"]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
