"""The example scripts: every option's default in --help, every solver mode offered, a clear message
without scikit-learn, and each script run end to end with tiny settings.

(example/spectrum.py and example/track_sharpness.py are run end to end by test_density.py and
test_tracking_plot.py, and example/distributed.py under torchrun by test_distributed.py.)
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hessian_eigenthings.solvers import registry
from hessian_eigenthings.solvers.registry import get_solver, solver_names

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "example"
SCRIPTS = ["main", "spectrum", "track_sharpness", "distributed"]


def load(name: str):
    """Import example/<name>.py as a module (the scripts import their helpers as ``common``)."""
    sys.path.insert(0, str(EXAMPLE))
    try:
        spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLE))
    return module


@contextlib.contextmanager
def torch_threads_kept():
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def help_text(name: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        load(name).main(["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_shows_every_options_default(name, capsys):
    text = help_text(name, capsys)
    options = re.split(r"\n  (?=-)", text.split("options:", 1)[1])[1:]
    assert len(options) >= 8
    for option in options:
        if option.startswith("-h, --help"):
            continue
        assert "(default:" in option, f"{name}.py --help: no default shown for {option.split()[0]}"


def test_main_offers_every_mode_of_the_library(capsys, monkeypatch):
    text = help_text("main", capsys)
    assert "{" + ",".join(["both", *solver_names()]) + "}" in text
    # read from the library at run time, not copied: a mode registered there shows up here
    entry = get_solver("thick_restart")
    monkeypatch.setitem(registry._REGISTRY, "my_solver", entry)
    assert "my_solver}" in help_text("main", capsys)


def test_missing_scikit_learn_names_the_extra_to_install(monkeypatch):
    common = load("common")
    monkeypatch.setitem(sys.modules, "sklearn", None)  # importing sklearn now raises ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(SystemExit, match=re.escape('pip install -e ".[examples]"')):
        common.digits_dataset()


def eigen_table(text: str, mode: str) -> list[tuple[float, float]]:
    """(eigenvalue, relative residual) rows printed after ``<mode>: N Hessian-vector products``."""
    section = text.split(f"\n{mode}: ", 1)[1]
    rows = re.findall(r"^\s*\d+\s+(-?\d+\.\d+)\s+\S+\s+(\S+)\s*$", section, flags=re.M)
    return [(float(value), float(rel)) for value, rel in rows]


TINY = ["--k", "2", "--epochs", "1", "--width", "8", "--quiet", "--power-iter-steps", "1000"]


def run_main(mode: str) -> list[tuple[float, float]]:
    """example/main.py with tiny settings in one mode; its (eigenvalue, relative residual) table."""
    out = io.StringIO()
    with torch_threads_kept(), contextlib.redirect_stdout(out):
        load("main").main(TINY + ["--mode", mode])
    return eigen_table(out.getvalue(), mode)


@pytest.fixture(scope="module")
def arpack_reference():
    return run_main("lanczos")


@pytest.mark.parametrize("mode", [
    pytest.param(m, marks=pytest.mark.slow) if m == "power_iter" else m  # hundreds of products per pair
    for m in solver_names() if m != "lanczos"
])
def test_main_runs_each_mode_to_a_converged_answer(mode, arpack_reference):
    """Tiny settings; every mode finds the top eigenvalues that ARPACK finds, each pair converged."""
    rows = run_main(mode)
    assert len(rows) == len(arpack_reference) == 2
    for (value, rel), (ref_value, ref_rel) in zip(rows, arpack_reference):
        assert rel <= 1e-4 and ref_rel <= 1e-6
        assert value == pytest.approx(ref_value, rel=1e-3)


def test_distributed_example_runs_as_one_process_without_torchrun(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with torch_threads_kept():
        load("distributed").main(["--k", "2", "--epochs", "1", "--width", "8", "--quiet"])
    out = capsys.readouterr().out
    assert "Not started by torchrun" in out and "1 rank(s), shards of [1797] samples" in out
    assert all(rel <= 1e-6 for _, rel in eigen_table(out, "lanczos on 1 rank(s)"))


@pytest.mark.slow
def test_figure_script_runs_quickly(tmp_path):
    pytest.importorskip("matplotlib")
    proc = subprocess.run([sys.executable, str(ROOT / "docs" / "make_figures.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("spectral_density.png", "sharpness.png", "convergence.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
