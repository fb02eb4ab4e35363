"""A griffe extension for the API pages: the package's docstrings use Sphinx roles such as
:class:`Operator` and :func:`~pkg.mod.name`, which Markdown would show as they are typed. They are
turned into inline code (the last dotted part where the role asks for it with ``~``) before
mkdocstrings renders the docstrings, so the sources keep their roles."""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|obj|exc|data|const):`(?P<tilde>~?)(?P<target>[^`]+)`")


def _plain(match: re.Match) -> str:
    target = match["target"]
    if match["tilde"]:
        target = target.rsplit(".", 1)[-1]
    return f"``{target}``"


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx cross-reference roles in every docstring as inline code."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ":`" in obj.docstring.value:
            obj.docstring.value = _ROLE.sub(_plain, obj.docstring.value)
