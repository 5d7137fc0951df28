"""The wheel: built from the repo, installed alone (no source tree, no editable hook), it runs
the bundled model. Guards the layout against path arithmetic that only works in the repo."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_runs_depth_and_eval_without_the_repo(tmp_path):
    # Built from a copy, so setuptools' build/ folder never lands in (or goes stale in) the repo.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", "out", "runs"))
    dist = tmp_path / "dist"
    # No build isolation: the venv's setuptools (a torch dependency) builds it, no download.
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                        "--no-build-isolation", "-w", str(dist), str(src)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = dist.glob("densert-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    # the symlinked subpackages are real files in the wheel, package data included
    for f in ("densert/runtime/predictor.py", "densert/kernels/dense_head.py",
              "densert/benchmarks/schema.json", "densert/assets/densert-tiny/model.safetensors"):
        assert f in names, f
    assert not any(n.startswith(("runtime/", "kernels/", "densert/densert/")) for n in names)

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                    str(site), str(whl)], check=True, capture_output=True, text=True)
    work = tmp_path / "work"  # no repo here: only the installed package can answer
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "DENSERT_CACHE_DIR": str(tmp_path / "cache")}

    def densert(*args):
        r = subprocess.run([sys.executable, "-m", "densert", *args], cwd=work, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return r

    def snapshot():
        return {(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in site.rglob("*")
                if f.is_file() and "__pycache__" not in f.parts}

    before = snapshot()
    where = subprocess.run([sys.executable, "-c", "import densert; print(densert.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).is_relative_to(site)
    densert("depth", str(ROOT / "samples" / "scene_3.png"), "--preset", "cityscapes", "--out", "o")
    assert (work / "o" / "scene_3.depth.npy").is_file()
    r = densert("eval", "--n", "2")
    assert '"delta1"' in r.stdout
    assert snapshot() == before  # nothing was written into the installed package
