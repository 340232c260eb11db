"""The testing recipes in examples/ (test_recipe_*.py) run as a user runs them, and catch breakage.

Each recipe file is run with pytest in a subprocess, the kit's plugin
enabled with ``-p`` as the docs show: its working variant must pass and its
deliberately broken variant (marked ``xfail(strict=True)``) must fail --
were the broken variant to pass, the recipe would not be testing its
guarantee, and strict xfail turns that into a failure. One of them also
runs under pytest-xdist.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(p.name for p in (ROOT / "examples").glob("test_recipe_*.py"))


def run(recipe: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "wsgi_detach_pytest.plugin",
         "-p", "no:cacheprovider", "-q", "-rxX", *extra, f"examples/{recipe}"],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )


def test_the_three_recipes_are_there() -> None:
    assert RECIPES == ["test_recipe_client_left.py", "test_recipe_slow_client.py",
                       "test_recipe_sse_resume.py"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_passes_and_its_broken_variant_fails(recipe: str) -> None:
    done = run(recipe)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    assert " passed" in summary and " xfailed" in summary, done.stdout
    assert "xpassed" not in summary and "failed" not in summary.replace("xfailed", "")


@pytest.mark.timeout(240)
def test_a_recipe_under_xdist() -> None:
    done = run("test_recipe_client_left.py", "-p", "xdist", "-n", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed, 2 xfailed" in done.stdout, done.stdout
