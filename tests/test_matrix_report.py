"""tests/matrix_report.py: recorded cells become the README's table, between its markers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests import matrix_report

CELLS = [  # (server, case, outcome, text, note), in no particular order
    ("pywsgi", "stream", "passed", "1 ms", None),
    ("pywsgi", "idle", "limited", "0.40 s", "heartbeat"),
    ("wsgiref", "idle", "limited", "0.41 s", "heartbeat"),
    ("wsgiref", "fail_mid", "limited", "", "http10"),
    ("cheroot", "queue", "failed", "", None),
]


def results() -> dict[str, Any]:
    cells: dict[str, dict[str, Any]] = {}
    for server, case, outcome, text, note in CELLS:
        matrix_report.record(cells, server, case, outcome=outcome, text=text, note=note)
    return {"when": "then", "machine": "here", "results": cells}


def test_render_orders_columns_and_rows_and_numbers_footnotes_once() -> None:
    lines = matrix_report.render(results()).splitlines()
    # Columns and rows follow SERVERS and CASES, whatever order the results came in.
    assert lines[0] == "| case | gevent.pywsgi | wsgiref (threads) | cheroot |"
    assert lines[2:6] == [
        f"| {matrix_report.CASES['stream']} | ✓ 1 ms | - | - |",
        f"| {matrix_report.CASES['queue']} | - | - | ✗ FAILED |",
        f"| {matrix_report.CASES['idle']} | ✓ 0.40 s [1] | ✓ 0.41 s [1] | - |",
        f"| {matrix_report.CASES['fail_mid']} | - | ✓ [2] | - |",
    ]
    assert lines[-2:] == [
        f"1. {matrix_report.NOTES['heartbeat']}",
        f"2. {matrix_report.NOTES['http10']}",
    ]


def test_update_readme_replaces_only_what_is_between_the_markers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(
        f"# Title\n\nbefore\n\n{matrix_report.START}\nold table\n{matrix_report.END}\n\nafter\n"
    )
    matrix_report.update_readme("new table", readme)
    assert readme.read_text() == (
        f"# Title\n\nbefore\n\n{matrix_report.START}\nnew table\n{matrix_report.END}\n\nafter\n"
    )


def test_update_readme_appends_a_section_when_the_markers_are_missing(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n")
    matrix_report.update_readme("the table", readme)
    text = readme.read_text()
    assert text.startswith("# Title\n\n## Server compatibility matrix\n\n")
    assert text.endswith(f"{matrix_report.START}\nthe table\n{matrix_report.END}\n")


def test_every_note_is_attached_by_some_case() -> None:
    source = (Path(__file__).parent / "test_matrix.py").read_text()
    unused = [name for name in matrix_report.NOTES if f'"{name}"' not in source]
    assert unused == []
