"""Per-layer summaries: each diagonal block's top eigenvalue, trace and Frobenius norm against the
blocks of the dense float64 Hessian and GGN; the table's text and plot."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from analysis_helpers import block_of, dense_ggn_cross_entropy
from helpers import batches, classification_data, dense_loss_hessian, small_mlp
from hessian_eigenthings import Hessian, LayerSummary, LayerTable

F = nn.functional


@pytest.fixture(scope="module")
def problem():
    """A float64 tanh MLP (10 -> 8 -> 8 -> 4), 150 samples, its dense Hessian and GGN."""
    model = small_mlp(width=8)
    x, y = classification_data(num=150)
    data = batches(x, y, [100, 50])
    return model, data, dense_loss_hessian(model, F.cross_entropy, x, y), dense_ggn_cross_entropy(model, x, y)


def reference(matrix: torch.Tensor) -> tuple[float, float, float]:
    values = torch.linalg.eigvalsh(matrix)
    return float(values[-1]), float(matrix.trace()), float(torch.linalg.matrix_norm(matrix))


def test_exact_blocks_equal_the_blocks_of_the_dense_hessian_and_ggn(problem):
    model, data, hessian, ggn = problem
    h = Hessian(model, data, F.cross_entropy, verbose=False)
    table = h.per_layer(curvatures=("hessian", "ggn"))
    assert isinstance(table, LayerTable) and all(isinstance(row, LayerSummary) for row in table)
    assert table.names() == ["0", "2", "4"] and table.curvatures() == ["hessian", "ggn"]
    for row in table:
        dense = hessian if row.curvature == "hessian" else ggn
        top, trace, frob = reference(block_of(dense, model, row.params))
        assert row.exact and row.converged and row.trace_std_error == 0
        assert row.size == len(block_of(dense, model, row.params))
        assert row.num_products == row.size  # one product per parameter
        assert row.top_eigenvalue == pytest.approx(top, rel=1e-9)
        assert row.trace == pytest.approx(trace, rel=1e-9)
        assert row.frobenius == pytest.approx(frob, rel=1e-9)
    # the blocks differ for a tanh network (its outputs are not linear in one layer's weights)
    assert table.get("2", "hessian").top_eigenvalue != pytest.approx(table.get("2", "ggn").top_eigenvalue, rel=1e-3)
    # the groups partition the parameters: the block traces add up to the whole trace
    assert sum(row.trace for row in table if row.curvature == "hessian") == pytest.approx(float(hessian.trace()))


def test_estimated_blocks_agree_with_the_dense_blocks_within_their_errors(problem):
    model, data, hessian, ggn = problem
    h = Hessian(model, data, F.cross_entropy, verbose=False)
    table = h.per_layer(["0", "2"], curvatures=("hessian", "ggn"), exact_max_size=0, max_products=60, seed=1)
    for row in table:
        dense = hessian if row.curvature == "hessian" else ggn
        top, trace, frob = reference(block_of(dense, model, row.params))
        assert not row.exact and row.converged
        assert row.info["relative_residual"] <= 1e-5
        assert row.top_eigenvalue == pytest.approx(top, rel=1e-8)
        assert 0 < row.trace_std_error and abs(row.trace - trace) < 5 * row.trace_std_error
        assert 0 < row.frobenius_std_error and abs(row.frobenius - frob) < 5 * row.frobenius_std_error
        assert row.num_products >= 2 * 60


def test_relative_tolerance_is_met_or_reported(problem):
    model, data, _, _ = problem
    h = Hessian(model, data, F.cross_entropy, verbose=False)
    table = h.per_layer(["0"], exact_max_size=0, rtol=0.05, max_products=400)
    row = table[0]
    assert row.converged and row.trace_std_error <= 0.05 * abs(row.trace) + 1e-12
    assert "NOT converged" not in str(table)


def test_depth_groups_and_a_params_restricted_object(problem):
    model, data, hessian, _ = problem
    h = Hessian(model, data, F.cross_entropy, params=["2", "4"], verbose=False)
    table = h.per_layer(depth=1)
    assert table.names() == ["2", "4"]
    top, trace, frob = reference(block_of(hessian, model, ["2.weight", "2.bias"]))
    row = table.get("2")
    assert (row.top_eigenvalue, row.trace, row.frobenius) == pytest.approx((top, trace, frob), rel=1e-9)
    with pytest.raises(ValueError, match="does not cover"):
        h.per_layer(["0"])


def test_block_operators_differentiate_only_their_group(problem, monkeypatch):
    model, data, _, _ = problem
    h = Hessian(model, data, F.cross_entropy, verbose=False)
    seen = []
    original = type(h.operator).build

    def spy(self, inputs, targets, label):
        seen.append(list(self.param_names))
        return original(self, inputs, targets, label)

    monkeypatch.setattr(type(h.operator), "build", spy)
    h.per_layer(["4"])
    assert seen and all(names == ["4.weight", "4.bias"] for names in seen)


def test_table_text_and_records():
    table = LayerTable([
        LayerSummary("encoder", "hessian", ("encoder.weight",), 1000, 12.5, 40.25, 20.0, 0.5, 0.25, exact=False,
                     num_products=300),
        LayerSummary("head", "hessian", ("head.weight", "head.bias"), 44, 3.0, 9.0, 4.0),
        LayerSummary("head", "ggn", ("head.weight", "head.bias"), 44, 2.5, 8.0, 3.5, converged=False, exact=False),
    ])
    text = str(table)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["group", "params", "curvature"]
    assert "40.25 +- 0.5" in text and "estimated, NOT converged" in lines[-1] and "exact" in lines[3]
    rule_starts = [i for i, c in enumerate(lines[1]) if c == "-" and (i == 0 or lines[1][i - 1] == " ")]
    header_starts = [lines[0].index(word) for word in ("group", "params", "curvature")]
    assert rule_starts[0] == header_starts[0] and len(rule_starts) == 7  # one rule per column
    for line in lines[2:]:
        assert line[rule_starts[2]:].startswith(("hessian", "ggn"))  # the curvature column lines up
    assert table.get("head", "ggn").top_eigenvalue == 2.5 and table.get("head").mean_eigenvalue == 9.0 / 44
    with pytest.raises(KeyError, match="groups: encoder, head"):
        table.get("tail")
    ggn_only = LayerTable([row for row in table if row.curvature == "ggn"])
    assert ggn_only.get("head").curvature == "ggn"  # a table of another curvature needs no curvature named
    assert table.to_dicts()[0]["params"] == ("encoder.weight",) and table.to_dicts()[1]["size"] == 44


def test_bar_plot(problem, tmp_path):
    pytest.importorskip("matplotlib")
    model, data, _, _ = problem
    table = Hessian(model, data, F.cross_entropy, verbose=False).per_layer(curvatures=("hessian", "ggn"))
    fig = table.plot(tmp_path / "layers.png")
    assert (tmp_path / "layers.png").read_bytes()[:4] == b"\x89PNG"
    axes = [ax for ax in fig.axes]
    assert len(axes) == 3 and [t.get_text() for t in axes[0].get_xticklabels()][0].startswith("0\n(")
    heights = sorted(p.get_height() for p in axes[1].patches)
    expected = sorted(row.trace for row in table)
    assert np.allclose(heights, expected)
    with pytest.raises(ValueError, match="quantities"):
        table.plot(quantities=("sharpness",))
    many = LayerTable([LayerSummary(f"layer{i}", "hessian", (), 10, 1.0 + i, 2.0, 1.0) for i in range(9)])
    assert len(many.plot(quantities=("top_eigenvalue",)).axes) == 1


def test_bad_settings_are_refused(problem):
    model, data, _, _ = problem
    h = Hessian(model, data, F.cross_entropy, verbose=False)
    with pytest.raises(ValueError, match="exact_max_size"):
        h.per_layer(exact_max_size=-1)
    with pytest.raises(ValueError, match="curvature="):
        h.per_layer(curvatures=("hessain",))
    with pytest.raises(TypeError, match="curvatures must be"):
        h.per_layer(curvatures="ggn")
    with pytest.raises(ValueError, match="max_products"):
        h.per_layer(max_products=0)
    with pytest.raises(ValueError, match="mode="):
        h.per_layer(mode="fastest")
    with pytest.raises(ValueError, match="trace_method="):
        h.per_layer(trace_method="exact")
    with pytest.raises(ValueError, match="frobenius_method="):
        h.per_layer(frobenius_method="exact")
    assert math.isfinite(h.per_layer(["4"])[0].top_eigenvalue)


def test_a_budget_too_small_for_an_error_estimate_is_refused_before_any_block(problem):
    model, data = problem[0], problem[1]
    h = Hessian(model, data, F.cross_entropy, verbose=False)
    with pytest.raises(ValueError, match="max_products must be at least 4"):
        h.per_layer(max_products=3, exact_max_size=0)
    assert h.operator.num_products == 0
