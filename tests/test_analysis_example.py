"""example/analysis.py: every option's default in --help, and a run end to end with tiny settings."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "example"


def load():
    sys.path.insert(0, str(EXAMPLE))
    try:
        spec = importlib.util.spec_from_file_location("example_analysis", EXAMPLE / "analysis.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLE))
    return module


def test_help_shows_every_options_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load().main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    options = re.split(r"\n  (?=-)", text.split("options:", 1)[1])[1:]
    assert len(options) >= 12
    for option in options:
        if not option.startswith("-h, --help"):
            assert "(default:" in option, f"no default shown for {option.split()[0]}"


def test_runs_with_tiny_settings(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    threads = torch.get_num_threads()
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            load().main(["--out-dir", str(tmp_path), "--epochs", "1", "--width", "8", "--k", "2", "--probes", "2",
                         "--steps", "10", "--layer-products", "30", "--trace-products", "30", "--grid", "4",
                         "--quiet"])
    finally:
        torch.set_num_threads(threads)
    text = out.getvalue()
    for name in ("density", "layers", "landscape_1d", "landscape"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = text.split("Per-layer blocks", 1)[1]
    rows = re.findall(r"^(\d) \((\d+)->(\d+)\)\s+(\d+)\s+(hessian|ggn)\s", table, flags=re.M)
    assert [(r[0], r[4]) for r in rows] == [(i, c) for i in "024" for c in ("hessian", "ggn")]
    assert all(int(r[3]) == (int(r[1]) + 1) * int(r[2]) for r in rows)  # weights and biases of the layer
    assert "read the dataloader 1 time(s)" in text
    relative = [float(v) for v in re.findall(r"^\s+\d+\s+-?\d+\.\d+\s+\S+\s+(\S+)$", text, flags=re.M)]
    assert len(relative) == 2 and all(r <= 1e-5 for r in relative)
