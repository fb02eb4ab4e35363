"""plot_log draws a log (eigenvalues against steps, loss on a second axis, a threshold line), and says
how to install matplotlib when it is missing; the example script runs end to end."""

import importlib.util
import os
import sys

import pytest
import torch

from hessian_eigenthings import SharpnessRecord, plot_log, read_log

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "example", "track_sharpness.py")


def records():
    return [
        SharpnessRecord(step=s, eigenvalues=[1.0 + s, 0.5 + s], residuals=[1e-6, 1e-6], converged=[True, True],
                        products=10, seconds=0.1, warm=s > 0, which="LA", extras={"loss": 2.0 / (1 + s)})
        for s in range(0, 50, 10)
    ]


def test_plot_draws_every_eigenvalue_the_loss_and_the_threshold(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "plot.png"
    fig = plot_log(records(), out, threshold=40.0, threshold_label="2/lr")
    assert out.exists() and out.stat().st_size > 1000
    ax, loss_ax = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"$\\lambda_{1}$", "$\\lambda_{2}$", "2/lr"}
    assert list(lines["$\\lambda_{1}$"].get_xdata()) == [0, 10, 20, 30, 40]
    assert list(lines["$\\lambda_{2}$"].get_ydata()) == [0.5, 10.5, 20.5, 30.5, 40.5]
    assert list(lines["2/lr"].get_ydata()) == [40.0, 40.0]
    assert list(loss_ax.get_lines()[0].get_ydata()) == [2.0 / (1 + s) for s in range(0, 50, 10)]
    assert loss_ax.get_yscale() == "log"


def test_plot_needs_records():
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match="no records"):
        plot_log([])


def test_missing_matplotlib_gives_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"hessian_eigenthings\[plot\]"):
        plot_log(records())


def load_example():
    sys.path.insert(0, os.path.dirname(EXAMPLE))  # the script imports helpers from example/common.py
    try:
        spec = importlib.util.spec_from_file_location("track_sharpness_example", EXAMPLE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    return module


@pytest.mark.parametrize("model, log_format, samples", [("mlp", "jsonl", "1797"), ("cnn", "csv", "150")])
def test_example_script_writes_the_log_and_the_plot(tmp_path, model, log_format, samples):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    threads = torch.get_num_threads()
    try:
        tracker = load_example().main(["--steps", "20", "--every", "10", "--k", "2", "--width", "8", "--samples", samples,
                                       "--model", model, "--log-format", log_format, "--out", str(tmp_path),
                                       "--quiet"])
    finally:
        torch.set_num_threads(threads)
    assert tracker.closed  # the example releases the log and its lock when training ends
    log = tmp_path / f"sharpness.{log_format}"
    assert (tmp_path / "sharpness.png").stat().st_size > 1000
    assert [r.step for r in read_log(log)] == [0, 10, 20]
    assert [r.as_dict() for r in read_log(log)] == [r.as_dict() for r in tracker.records]
    assert all(len(r.eigenvalues) == 2 and r.eigenvalues[0] >= r.eigenvalues[1] > 0 for r in tracker.records)
