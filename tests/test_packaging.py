"""The package metadata, and the source distribution: built, installed in a fresh virtual
environment, and tested there with the tests it ships."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import hessian_eigenthings

ROOT = Path(__file__).resolve().parents[1]

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = pytest.importorskip("tomli")


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_metadata_matches_the_package():
    project = pyproject()["project"]
    assert project["name"] == "hessian_eigenthings"
    assert project["version"] == hessian_eigenthings.__version__ == "1.0.0"
    assert project["license"] == "MIT" and "Typing :: Typed" in project["classifiers"]
    names = {dep.split(">")[0].split("=")[0].strip() for dep in project["dependencies"]}
    assert names == {"torch", "numpy", "scipy", "tqdm"}
    assert "torch>=2.1" in project["dependencies"]
    assert {"test", "examples", "plot", "docs"} <= set(project["optional-dependencies"])
    assert (ROOT / "hessian_eigenthings" / "py.typed").exists()
    assert "MIT License" in (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "the hessian_eigenthings developers" in (ROOT / "LICENSE").read_text(encoding="utf-8")


def _run(cmd: list, cwd: Path, timeout: float = 600, env: dict | None = None) -> str:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def _fresh_venv(path: Path) -> Path:
    """A new virtual environment that sees this one's packages (torch, numpy, pytest, ...) through a
    .pth line, so that torch is not installed again; its own site-packages comes first."""
    _run([sys.executable, "-m", "venv", "--without-pip", path], cwd=path.parent)
    python = path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    own = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=path).strip())
    # every site-packages folder this interpreter sees, also those that a .pth file added
    outer = [p for p in dict.fromkeys(site.getsitepackages() + sys.path)
             if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
    (own / "outer_packages.pth").write_text("\n".join(outer) + "\n", encoding="utf-8")
    return python


@pytest.mark.slow
def test_sdist_installs_in_a_fresh_venv_and_its_tests_pass(tmp_path):
    """Build the sdist as a release would, install it with pip into a new venv, and from outside the
    source tree import it, solve, and run a few of the tests it carries (with their conftest.py and
    helpers.py, and the example scripts they call)."""
    pytest.importorskip("build")
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--sdist", "--outdir", dist, ROOT], cwd=tmp_path, timeout=900)
    (sdist,) = dist.glob("hessian_eigenthings-*.tar.gz")

    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for needed in ("tests/conftest.py", "tests/helpers.py", "pytest.ini", "LICENSE", "README.md",
                   "hessian_eigenthings/py.typed", "example/main.py", "example/common.py"):
        assert needed in names, f"the sdist lacks {needed}"

    # nothing may reach the source tree: no PYTHONPATH in the fresh environment's processes
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    python = _fresh_venv(tmp_path / "venv")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-input", sdist], cwd=tmp_path, timeout=900,
         env=env)

    smoke = (
        "import pathlib, numpy as np, torch, hessian_eigenthings as he\n"
        "root = pathlib.Path(he.__file__).parent\n"
        "assert 'venv' in str(root), root\n"
        "assert (root / 'py.typed').exists()\n"
        "a = torch.diag(torch.arange(1.0, 51.0, dtype=torch.float64))\n"
        "r = he.thick_restart_lanczos(a, num_eigenthings=3, verbose=False)\n"
        "assert np.allclose(r.eigenvalues, [50, 49, 48]) and r.converged.all()\n"
        "print('installed at', root)\n"
    )
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    assert "installed at" in _run([python, "-c", smoke], cwd=run_dir, env=env)

    # The shipped tests, against the installed package: the source copy of the package is removed
    # so that nothing can import it instead.
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path / "src", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (src,) = (tmp_path / "src").iterdir()
    shutil.rmtree(src / "hessian_eigenthings")
    out = _run([python, "-m", "pytest", "-q", "-x", "tests/test_arpack.py", "tests/test_eigenthings.py",
                "tests/test_threads.py"], cwd=src, timeout=900, env=env)
    assert " passed" in out and "failed" not in out
