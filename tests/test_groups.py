"""Parameter groups of the per-layer summaries: by owning module, by depth, and the user's own."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from hessian_eigenthings import parameter_groups


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))  # owned by the model itself
        self.encoder = nn.Sequential(OrderedDict(first=nn.Linear(3, 4), second=nn.Linear(4, 4)))
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.norm(self.encoder(x * self.scale)))


def names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_default_groups_are_the_modules_that_own_parameters():
    model = Net()
    groups = parameter_groups(model, names(model))
    assert groups == {
        "(model)": ["scale"],
        "encoder.first": ["encoder.first.weight", "encoder.first.bias"],
        "encoder.second": ["encoder.second.weight", "encoder.second.bias"],
        "norm": ["norm.weight", "norm.bias"],
        "head": ["head.weight", "head.bias"],
    }


def test_depth_cuts_the_module_tree():
    model = Net()
    assert parameter_groups(model, names(model), depth=1) == {
        "(model)": ["scale"],
        "encoder": ["encoder.first.weight", "encoder.first.bias", "encoder.second.weight", "encoder.second.bias"],
        "norm": ["norm.weight", "norm.bias"],
        "head": ["head.weight", "head.bias"],
    }
    assert parameter_groups(model, names(model), depth=5) == parameter_groups(model, names(model))


def test_groups_cover_only_the_chosen_parameters():
    model = Net()
    chosen = ["encoder.second.bias", "head.weight"]
    assert parameter_groups(model, chosen) == {"encoder.second": ["encoder.second.bias"], "head": ["head.weight"]}
    with pytest.raises(ValueError, match="does not cover"):
        parameter_groups(model, chosen, ["encoder"])


def test_user_groups_by_prefix_name_tensor_list_and_mapping():
    model = Net()
    everything = names(model)
    groups = parameter_groups(model, everything, ["encoder", "head.weight", model.norm.bias, ["scale", "norm.weight"]])
    assert groups == {
        "encoder": ["encoder.first.weight", "encoder.first.bias", "encoder.second.weight", "encoder.second.bias"],
        "head.weight": ["head.weight"],
        "norm.bias": ["norm.bias"],
        "scale,norm.weight": ["scale", "norm.weight"],
    }
    assert parameter_groups(model, everything, {"body": ["encoder", "norm"], "out": "head"}) == {
        "body": ["encoder.first.weight", "encoder.first.bias", "encoder.second.weight", "encoder.second.bias",
                 "norm.weight", "norm.bias"],
        "out": ["head.weight", "head.bias"],
    }
    # overlapping groups are separate blocks
    assert list(parameter_groups(model, everything, ["encoder", "encoder.first"])) == ["encoder", "encoder.first"]
    assert parameter_groups(model, everything, "head") == {"head": ["head.weight", "head.bias"]}


def test_bad_groups_get_clear_errors():
    model = Net()
    everything = names(model)
    with pytest.raises(ValueError, match="either groups= or depth="):
        parameter_groups(model, everything, ["head"], depth=1)
    with pytest.raises(ValueError, match="no parameter named 'decoder'"):
        parameter_groups(model, everything, ["decoder"])
    with pytest.raises(ValueError, match="used twice"):
        parameter_groups(model, everything, ["head", "head"])
    with pytest.raises(ValueError, match="empty"):
        parameter_groups(model, everything, [])
    with pytest.raises(TypeError, match="groups must be"):
        parameter_groups(model, everything, [3])
    with pytest.raises(ValueError, match="depth must be a positive integer"):
        parameter_groups(model, everything, depth=0)


def test_a_module_prefix_takes_its_trainable_parameters_and_skips_frozen_ones():
    model = Net()
    model.head.bias.requires_grad_(False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    # the same group as the default one of the module
    assert parameter_groups(model, trainable, ["head"]) == {"head": ["head.weight"]}
    assert parameter_groups(model, trainable)["head"] == ["head.weight"]
    # a frozen parameter named on its own is still refused, and so is a prefix with nothing trainable
    with pytest.raises(ValueError, match="requires_grad=False"):
        parameter_groups(model, trainable, ["head.bias"])
    model.head.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=False"):
        parameter_groups(model, [n for n in trainable if n != "head.weight"], ["head"])
    with pytest.raises(ValueError, match="a group is empty"):
        parameter_groups(model, trainable, {"nothing": []})
