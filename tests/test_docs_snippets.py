"""Every ``python`` block in README.md and docs/*.md runs as written; the README links resolve.

A block whose fence is preceded by the line ``<!-- fragment -->`` cannot run
alone and is only compiled. Every other block runs in a subprocess
(tests/snippet_runner.py), bounded in time. A block that defines a WSGI
``app`` is served on a free loopback port (its own closing
``serve_forever()``/``run()`` line removed) and ``GET /`` must answer 200 with
a complete response -- or, for an endless ``text/event-stream``, with two
events. A block without an ``app`` must exit 0.
"""

from __future__ import annotations

import ast
import configparser
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.client import Stream
from tests.servers import CHILD_ENV, ROOT

FRAGMENT = "<!-- fragment -->"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Calls that start a server: a block's last statement calling one is
#: replaced by the runner's own server on a free port.
SERVING_CALLS = {"serve_forever", "run", "serve"}


class Block(NamedTuple):
    page: Path
    line: int  # of the opening fence, 1-based
    source: str
    fragment: bool

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def _blocks() -> list[Block]:
    blocks = []
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            if lines[i].strip() == "```python":
                end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
                fragment = i > 0 and lines[i - 1].strip() == FRAGMENT
                blocks.append(Block(page, i + 1, "\n".join(lines[i + 1 : end]) + "\n", fragment))
                i = end
            i += 1
    return blocks


BLOCKS = _blocks()


def _without_own_server(source: str) -> str:
    tree = ast.parse(source)
    last = tree.body[-1] if tree.body else None
    if isinstance(last, ast.Expr) and isinstance(last.value, ast.Call):
        func = last.value.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in SERVING_CALLS:
            lines = source.splitlines()
            assert last.end_lineno is not None
            return "\n".join(lines[: last.lineno - 1] + lines[last.end_lineno :]) + "\n"
    return source


def test_the_pages_have_blocks() -> None:
    assert {b.page.name for b in BLOCKS} >= {"README.md", "middleware.md", "quickstart.md"}


@pytest.mark.parametrize("block", [b for b in BLOCKS if not b.fragment],
                         ids=[b.name for b in BLOCKS if not b.fragment])
def test_a_block_with_a_wsgi_function_can_be_served(block: Block) -> None:
    """A block that writes a WSGI function names its app ``app``, so that it is
    served and requested here (and a reader can run it)."""
    tree = ast.parse(block.source)
    wsgi = [
        f.name for f in ast.walk(tree)
        if isinstance(f, ast.FunctionDef)
        and [a.arg for a in f.args.args[:2]] == ["environ", "start_response"]
    ]
    names = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
             if isinstance(t, ast.Name)}
    names |= {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert not wsgi or "app" in names, f"{block.name}: {wsgi} but no app"


@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_block_runs(block: Block, tmp_path: Path) -> None:
    compile(block.source, block.name, "exec")
    if block.fragment:
        return
    script = tmp_path / "snippet.py"
    script.write_text(_without_own_server(block.source), encoding="utf-8")
    with subprocess.Popen(
        [sys.executable, "-m", "tests.snippet_runner", str(script)],
        cwd=tmp_path, env=CHILD_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as proc:
        try:
            assert proc.stdout is not None and proc.stderr is not None
            first = proc.stdout.readline()  # bounded by pytest-timeout
            if first != "DONE\n":
                assert first.startswith("LISTENING "), f"{block.name}: {proc.stderr.read()}"
                _request(block, int(first.split()[1]))
                proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0, f"{block.name}: {proc.stderr.read()}"
        finally:
            if proc.poll() is None:
                proc.kill()


def _request(block: Block, port: int) -> None:
    with Stream(port, "/", timeout=15) as stream:
        head = stream.read_head()
        assert head.status == 200, f"{block.name}: GET / answered {head.status}"
        body = b""
        sse = head.headers.get("content-type", "").startswith("text/event-stream")
        while (chunk := stream.read_chunk()) is not None:
            body += chunk
            if sse and (b"\n" + body).count(b"\ndata:") >= 2:
                return  # an endless stream: its events keep coming
        assert stream.response.complete, f"{block.name}: the response was cut short: {body!r}"
        assert body, f"{block.name}: an empty response"


# ------------------------------------------------------------------------ links

LINK = re.compile(r"\]\(([^)\s]+)\)|^\[[^\]]+\]:\s*(\S+)", re.MULTILINE)


def _repository_url() -> str:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    urls = dict(
        line.split(" = ", 1)
        for line in config["metadata"]["project_urls"].strip().splitlines()
    )
    return urls["Source"].rstrip("/")


def test_the_readme_links_resolve() -> None:
    """Relative links break on PyPI: every link is absolute, and those into the
    repository name a file or directory that exists in the tree."""
    base = _repository_url()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = [a or b for a, b in LINK.findall(readme)]
    assert links
    inside = re.compile(re.escape(base) + r"(?:/(?:blob|tree)/main/([^#?]*))?(?:[#?].*)?$")
    for link in links:
        assert link.startswith("https://"), f"not absolute (breaks on PyPI): {link}"
        match = inside.match(link)
        if link.startswith(base) and link != f"{base}/issues":
            assert match, f"not a link to a file in the repository: {link}"
            path = match.group(1) or ""
            assert (ROOT / path).exists(), f"{link}: no {path} in the tree"


def test_every_example_is_listed_in_the_docs() -> None:
    docs = "".join(p.read_text(encoding="utf-8") for p in PAGES)
    for example in sorted((ROOT / "examples").glob("*.py")):
        if not example.name.startswith("_"):
            assert f"examples/{example.name}" in docs, f"examples/{example.name} is not in the docs"


FLASK_APP = """
from flask import Flask, Response, request
from wsgi_detach import DetachMiddleware, detach

flask_app = Flask(__name__)

@flask_app.route("/stream")
def stream():
    body = detach(request.environ)
    body.put("open\\n")
    return Response(body, mimetype="text/plain")

flask_app.wsgi_app = DetachMiddleware(flask_app.wsgi_app)   # the usual Flask wrapping
"""


@pytest.mark.parametrize("worker", ["gevent", "gthread"])
def test_the_gunicorn_hook_in_the_docs_drains_a_flask_app(worker: str, tmp_path: Path) -> None:
    (hook,) = [b for b in BLOCKS if "def post_worker_init" in b.source]
    (tmp_path / "gunicorn.conf.py").write_text(hook.source)
    (tmp_path / "flaskapp.py").write_text(FLASK_APP)
    command = [sys.executable, "-m", "gunicorn", "-k", worker, "-w", "1", "-b", "127.0.0.1:0",
               "--graceful-timeout", "2", "-c", "gunicorn.conf.py", "flaskapp:flask_app"]
    with subprocess.Popen(command, cwd=tmp_path, env=CHILD_ENV, stderr=subprocess.PIPE,
                          text=True) as proc:
        try:
            assert proc.stderr is not None
            log = ""
            while not (found := re.search(r"Booting worker with pid", log)):
                line = proc.stderr.readline()  # bounded by pytest-timeout
                assert line, f"gunicorn ended: {log}"
                log += line
            listening = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", log)
            assert found and listening, log
            port = int(listening.group(1))
            with Stream(port, "/stream", timeout=15) as stream:
                assert stream.read_head().status == 200
                proc.send_signal(signal.SIGTERM)  # the hook's drain: 1 s, then the stream is cut
                response = stream.read_all()
            assert (response.body, response.complete) == (b"open\n", False)
            assert proc.wait(timeout=15) == 0
            log += proc.stderr.read()
            # (The cut stream is logged by gunicorn as an error: that is the abort.)
            assert "AttributeError" not in log and "failed to boot" not in log, log
        finally:
            if proc.poll() is None:
                proc.kill()
