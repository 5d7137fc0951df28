"""Configure, build and ctest the native dense-head tail (C++ CPU, plus CUDA when nvcc exists)."""
import re
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
    out = {}
    for cmd in (["cmake", "-S", str(ROOT), "-B", str(b)], ["cmake", "--build", str(b), "-j2"],
                ["ctest", "--test-dir", str(b), "--output-on-failure", "-V"]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
        out[cmd[0]] = r.stdout
    # The edge cases ran: an empty map succeeds untouched, K = 0 is refused.
    assert "cpu empty map H=0: rc 0 (ok)" in out["ctest"] and "cpu K=0: rc 1 (ok)" in out["ctest"]
    if "CUDA tail enabled" not in out["cmake"]:
        return
    # One CUDA runtime: the shared libcudart (the one TensorRT and torch load) and no static
    # cudart beside it on the link line (CMake's default for targets linking CUDA code).
    link = (b / "CMakeFiles" / "test_dense_tail.dir" / "link.txt").read_text()
    assert "cudart_static" not in link, link
    assert re.search(r"libcudart\.so|-lcudart\b", link), link
