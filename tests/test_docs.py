"""The documentation's code runs and its structure holds together.

Every ```python block of README.md and docs/**/*.md is run, the blocks of one page in order in
one namespace (a page reads as one session), in a temporary folder. A block is left out only when
the line right above its fence is the marker ``<!-- docs-test: skip (reason) -->``; the reason is
required. ConvergenceWarning is an error here: an example must show a converged call.
"""

from __future__ import annotations

import importlib
import random
import re
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import hessian_eigenthings
from hessian_eigenthings import ConvergenceWarning

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,})(?P<info>[^`\n]*)$")
SKIP = re.compile(r"^\s*<!--\s*docs-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->\s*$")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the first code line
    language: str
    code: str
    skip_reason: str | None


def code_blocks(page: Path) -> list[Block]:
    """The fenced blocks of a Markdown page, dedented to their fence, with any skip marker."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, ticks = match["indent"], match["ticks"]
        language = match["info"].strip().split(" ")[0].lower() if match["info"].strip() else ""
        marker = SKIP.match(lines[i - 1]) if i > 0 else None
        body, j = [], i + 1
        while j < len(lines) and lines[j].strip() != ticks:
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        assert j < len(lines), f"{page}:{i + 1}: code fence never closed"
        blocks.append(Block(page, i + 2, language, "\n".join(body) + "\n", marker["reason"] if marker else None))
        i = j + 1
    return blocks


def python_blocks(page: Path) -> list[Block]:
    return [b for b in code_blocks(page) if b.language in ("python", "py")]


RUNNABLE = [page for page in [ROOT / "README.md", *PAGES] if python_blocks(page)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def docs_session(tmp_path, monkeypatch):
    """What a page's code may change, restored after it: working folder, torch threads, random
    states, warning filters, a torch.distributed group; torchrun's variables for one process."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
                        "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)
    threads, torch_rng, np_rng, py_rng = torch.get_num_threads(), torch.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            yield
    finally:
        import matplotlib.pyplot as plt
        import torch.distributed as dist

        plt.close("all")
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(threads)
        torch.set_rng_state(torch_rng)
        np.random.set_state(np_rng)
        random.setstate(py_rng)


@pytest.mark.parametrize("page", RUNNABLE, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(page, docs_session):
    namespace: dict = {"__name__": "__docs__"}
    for block in python_blocks(page):
        if block.skip_reason is not None:
            continue
        # blank lines in front keep the traceback's line numbers those of the page
        source = "\n" * (block.line - 1) + block.code
        exec(compile(source, str(page.relative_to(ROOT)), "exec"), namespace)


def test_skipped_blocks_are_few_and_say_why():
    skipped = [b for page in [ROOT / "README.md", *PAGES] for b in python_blocks(page) if b.skip_reason]
    total = sum(len(python_blocks(page)) for page in [ROOT / "README.md", *PAGES])
    assert all(len(b.skip_reason.strip()) >= 10 for b in skipped)
    assert len(skipped) <= max(3, total // 10), [f"{b.page.name}:{b.line}" for b in skipped]


def test_skip_markers_sit_right_above_a_python_block():
    for page in [ROOT / "README.md", *PAGES]:
        lines = page.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if "docs-test:" in line:
                assert SKIP.match(line), f"{page.name}:{i + 1}: write the marker as <!-- docs-test: skip (reason) -->"
                nxt = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
                assert nxt and nxt["info"].strip().startswith("python"), f"{page.name}:{i + 1}: no python block below"


def _nav_pages() -> list[str]:
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = text[text.index("\nnav:"):]
    nav = nav[: re.search(r"\n\S", nav[1:]).start() + 1] if re.search(r"\n\S", nav[1:]) else nav
    return re.findall(r":\s*([\w/.-]+\.md)\s*$", nav, flags=re.M)


def test_every_page_is_in_the_navigation_and_every_entry_exists():
    nav = _nav_pages()
    files = sorted(str(p.relative_to(DOCS)) for p in PAGES)
    assert sorted(set(nav)) == files, "mkdocs.yml nav and docs/*.md differ"
    assert len(nav) == len(set(nav))


def test_api_reference_names_resolve():
    """Every ``::: dotted.name`` of the API pages imports, so a rename fails here before mkdocs."""
    for page in (DOCS / "api").glob("*.md"):
        for dotted in re.findall(r"^:::\s*([\w.]+)\s*$", page.read_text(encoding="utf-8"), flags=re.M):
            parts = dotted.split(".")
            for cut in range(len(parts), 0, -1):
                try:
                    obj = importlib.import_module(".".join(parts[:cut]))
                except ImportError:
                    continue
                for attribute in parts[cut:]:
                    obj = getattr(obj, attribute)
                break
            else:
                pytest.fail(f"{page.name}: {dotted} does not import")


def test_every_public_name_has_an_api_entry():
    """A name exported by ``hessian_eigenthings`` needs a ``:::`` entry on an API page (any module path)."""
    documented = set()
    for page in (DOCS / "api").glob("*.md"):
        documented |= {d.rsplit(".", 1)[-1] for d in re.findall(r"^:::\s*([\w.]+)", page.read_text(encoding="utf-8"), flags=re.M)}
    missing = sorted(set(hessian_eigenthings.__all__) - documented)
    assert not missing, f"add these to a page of docs/api/: {missing}"


def test_images_exist_and_are_drawn_by_the_figure_script():
    script = (DOCS / "make_figures.py").read_text(encoding="utf-8")
    referenced = set()
    for page in PAGES:
        referenced |= set(re.findall(r"\]\((?:\.\./)*images/([\w.-]+\.png)\)", page.read_text(encoding="utf-8")))
    assert referenced, "no figure is shown"
    for name in referenced:
        assert (DOCS / "images" / name).stat().st_size > 10_000, name
        assert f'"{name}"' in script, f"{name} is not drawn by docs/make_figures.py"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = re.findall(r"python -m pytest[^\n`&;]*", readme)
    assert commands, "README.md gives no test command"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert any(re.search(rf"^\s*{re.escape(c.strip())}\s*$", ci, flags=re.M) for c in commands), commands
