"""Every example in examples/ imports, serves, and answers its paths on a real server.

Parametrised over the directory listing, so a new example is covered the day
it is added. An example module exposes a WSGI ``app``; it may list the paths
to request in ``SMOKE_PATHS``, else the paths of the ``http://127.0.0.1:PORT/...``
URLs its docstring tells the reader to open, else ``/``. Each path must answer 200
and send a first non-empty chunk within a few seconds (streams are not read
to the end). Modules starting with ``_`` are helpers, not examples; modules
starting with ``test_`` are testing recipes, which tests/test_recipes.py runs
with pytest as a user would.

Served by gevent.pywsgi after ``monkey.patch_all()`` (wsgi_detach.testing's
``serve(..., monkey_patch=True)``): the Bottle example
patches at import, as the primer does, and patching first is what it needs.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from wsgi_detach.testing import Stream, serve

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _examples() -> list[str]:
    names = [
        p.stem for p in EXAMPLES.glob("*.py") if not p.name.startswith(("_", "test_"))
    ]
    names += [p.name for p in EXAMPLES.iterdir() if (p / "__init__.py").is_file()]
    return sorted(names)


def _smoke_paths(name: str) -> list[str]:
    """``SMOKE_PATHS`` read from the source, without importing the module here."""
    source = EXAMPLES / f"{name}.py"
    if not source.is_file():
        source = EXAMPLES / name / "__init__.py"
    module = ast.parse(source.read_text())
    for node in module.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "SMOKE_PATHS" for t in targets):
                assert node.value is not None
                return list(ast.literal_eval(node.value))
    docstring = ast.get_docstring(module) or ""
    documented = re.findall(r"http://127\.0\.0\.1:\d+(/[^\s`'\")]*)", docstring)
    return list(dict.fromkeys(documented)) or ["/"]


def test_the_examples_are_found() -> None:
    assert {"bottle_app", "flask_app", "sse_ticker", "chat"} <= set(_examples())
    assert _smoke_paths("fetch_raw") == ["/fetch"]  # from its docstring


@pytest.mark.parametrize("name", _examples())
def test_example_serves(name: str) -> None:
    with serve(f"examples.{name}:app", "pywsgi", monkey_patch=True) as server:
        for path in _smoke_paths(name):
            with Stream(server, path, timeout=5) as stream:
                assert stream.status == 200, f"{name}: GET {path} answered {stream.status}"
                chunk = stream.next_chunk()
                assert chunk, f"{name}: GET {path} sent no body"


@pytest.mark.parametrize("name", _examples())
def test_example_takes_a_port_and_stops_quietly_on_ctrl_c(name: str) -> None:
    import signal
    import subprocess
    import sys

    from tests.servers import CHILD_ENV, ROOT

    with subprocess.Popen(
        [sys.executable, "-m", f"examples.{name}", "--port", "0"],
        cwd=ROOT, env=CHILD_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as proc:
        try:
            assert proc.stdout is not None and proc.stderr is not None
            line = proc.stdout.readline()  # bounded by pytest-timeout
            assert re.search(r"http://127\.0\.0\.1:[1-9]\d*/", line), line
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=10) == 0
            assert proc.stderr.read() == ""
        finally:
            if proc.poll() is None:
                proc.kill()


def test_the_chat_example_names_itself_in_its_help() -> None:
    import subprocess
    import sys

    from tests.servers import CHILD_ENV, ROOT

    done = subprocess.run([sys.executable, "examples/chat.py", "--help"], cwd=ROOT,
                          env=CHILD_ENV, capture_output=True, text=True, timeout=30)
    assert done.stdout.startswith("usage: chat.py [-h]")
