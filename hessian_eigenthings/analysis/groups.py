"""Parameter groups for per-layer summaries: which parameters make up each diagonal block.

A group is a label and a list of parameter names (in the model's order). Groups come from the
modules that own parameters directly (the default), from the module tree cut at a depth, or from
the user's own list of names and prefixes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, Sequence, Union

from torch import Tensor, nn

from ..model_utils import select_parameters
from ..utils import check_positive_int

#: The label of parameters that the model itself owns (not one of its submodules).
ROOT_LABEL = "(model)"

GroupSpec = Union[str, Tensor, Sequence[Union[str, Tensor]]]


def parameter_groups(
    model: nn.Module,
    chosen: Sequence[str],
    groups: Union[None, Sequence[GroupSpec], Mapping[str, GroupSpec]] = None,
    depth: Optional[int] = None,
) -> dict[str, list[str]]:
    """Split the chosen parameters of ``model`` into labelled groups.

    Args:
        model: the network.
        chosen: the names of the parameters to split (e.g. an operator's ``param_names``); a
            parameter outside them is never put in a group.
        groups: None (default: one group per module that owns chosen parameters directly, labelled
            by the module's name), or the user's groups: a list whose items are a parameter name or
            module prefix (``"fc1"`` takes ``fc1.weight`` and ``fc1.bias``), a parameter tensor, or a
            list of those (one group of all of them); or a mapping ``{label: item}``.
        depth: instead of ``groups``, cut the module tree at this depth: ``depth=1`` makes one group
            per top-level child (``encoder.layer.0.weight`` goes to ``encoder``).

    Returns:
        ``{label: [parameter names in the model's order]}``, groups in the order of their first
        parameter (the user's order for user groups); groups without chosen parameters are left out.
        User groups may overlap: each is its own block.
    """
    if groups is not None and depth is not None:
        raise ValueError("Pass either groups= or depth=, not both: depth cuts the module tree into groups itself.")
    chosen_set = set(chosen)
    order = [name for name, _ in model.named_parameters() if name in chosen_set]
    if groups is not None:
        return _user_groups(model, order, groups)
    if depth is not None:
        depth = check_positive_int(depth, "depth")
        return _grouped_by(order, lambda name: ".".join(_module_path(name).split(".")[:depth]))
    return _grouped_by(order, _module_path)


def _module_path(name: str) -> str:
    """The name of the module that owns parameter ``name`` directly ("" for the model itself)."""
    return name.rsplit(".", 1)[0] if "." in name else ""


def _grouped_by(order: list[str], key: Any) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name in order:
        out.setdefault(key(name) or ROOT_LABEL, []).append(name)
    return out


def _label(item: GroupSpec, model: nn.Module) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, Tensor):
        names, _ = select_parameters(model, [item])
        return names[0]
    return ",".join(_label(part, model) for part in item)


def _user_groups(
    model: nn.Module, order: list[str], groups: Union[Sequence[GroupSpec], Mapping[str, GroupSpec]]
) -> dict[str, list[str]]:
    if isinstance(groups, (str, Tensor)):
        groups = [groups]
    if isinstance(groups, Mapping):
        items = [(str(label), spec) for label, spec in groups.items()]
    else:
        try:
            items = [(_label(spec, model), spec) for spec in groups]
        except TypeError:
            raise TypeError(
                f"groups must be a list of parameter names, module prefixes or parameter tensors (or lists of "
                f"them), or a mapping label -> such items; got {type(groups).__name__}."
            ) from None
    if not items:
        raise ValueError("groups is empty; pass at least one parameter name or module prefix, or leave it None.")
    out: dict[str, list[str]] = {}
    for label, spec in items:
        if label in out:
            raise ValueError(f"groups: the label {label!r} is used twice; give each group its own label.")
        names = _group_names(model, spec)
        outside = [name for name in names if name not in order]
        if outside:
            raise ValueError(
                f"groups: {label!r} holds {', '.join(outside)}, which the analysis does not cover (not among its "
                f"parameters: {', '.join(order)}). Leave them out, or build the analysis without params=."
            )
        out[label] = names
    return out


def _group_names(model: nn.Module, spec: GroupSpec) -> list[str]:
    """The parameter names of one group, in the model's order. A module prefix takes the trainable
    parameters below it (frozen ones are never analysed, as in the default groups); a parameter
    named on its own, or given as a tensor, must be trainable."""
    items = [spec] if isinstance(spec, (str, Tensor)) else list(spec)
    named = list(model.named_parameters())
    wanted: set[str] = set()
    for item in items:
        if isinstance(item, str) and item not in dict(named):
            below = [(n, p) for n, p in named if n.startswith(item + ".")]
            trainable = [n for n, p in below if p.requires_grad]
            if below and not trainable:
                raise ValueError(f"groups: every parameter below {item!r} has requires_grad=False, so none is "
                                 f"analysed; leave {item!r} out or unfreeze its parameters.")
            if trainable:
                wanted.update(trainable)
                continue
        wanted.update(select_parameters(model, [item])[0])  # names, tensors; its errors say what is wrong
    if not wanted:
        raise ValueError("groups: a group is empty; give each group at least one parameter name or module prefix.")
    return [n for n, _ in named if n in wanted]
