"""The user's error table (docs/errors.md) against the codes the package can really raise.

A user branches on ``code`` and reads the table to learn when it happens and what to do,
so the table must list every code, and only those, each with the status the server
answers. The codes are collected from the code itself, so a new one cannot land
undocumented: every ``RbeeError`` class of ``rbee_jupyter.errors`` (by introspection),
every ``SomeError(..., code="X")`` written elsewhere in the package (by reading its
source), and the codes the HTTP layer gives to Tornado's own errors.

The README must also stand on its own: its links lead to files of this repository, and
no file of the project points at files outside it.
"""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

import rbee_jupyter
from rbee_jupyter import errors
from rbee_jupyter.errors import RbeeError
from rbee_jupyter.kernel.client import error_from_json
from rbee_jupyter.errors import HTTP_ERROR_CODES as _HTTP_CODES

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "errors.md"
PACKAGE = Path(rbee_jupyter.__file__).resolve().parent

# One table row: | `CODE` | status | `Class` | when | what to do |
_ROW = re.compile(r"^\|\s*`([A-Z][A-Z0-9_]*)`\s*\|\s*(\d{3})\s*\|\s*`(\w+)`\s*\|(.+)\|(.+)\|\s*$")


@dataclass(frozen=True)
class Raised:
    """One place that gives a code: its status, the Python class a caller catches, where it is."""

    code: str
    status: int
    cls: str
    where: str


@dataclass(frozen=True)
class Row:
    code: str
    status: int
    cls: str
    line: int


def documented() -> dict[str, Row]:
    """The rows of docs/errors.md by code; a code listed twice is an error of the table."""
    rows: dict[str, Row] = {}
    for n, line in enumerate(TABLE.read_text(encoding="utf-8").splitlines(), 1):
        m = _ROW.match(line)
        if m is None:
            continue
        code, status, cls, when, todo = m.groups()
        assert code not in rows, f"docs/errors.md lists {code} twice (lines {rows[code].line} and {n})"
        assert when.strip() and todo.strip(), f"docs/errors.md:{n}: {code} needs 'when' and 'what to do'"
        rows[code] = Row(code, int(status), cls, n)
    return rows


def _error_classes() -> dict[str, type[RbeeError]]:
    return {name: obj for name, obj in vars(errors).items()
            if inspect.isclass(obj) and issubclass(obj, RbeeError) and obj.__module__ == errors.__name__}


def _from_classes() -> list[Raised]:
    return [Raised(cls.code, cls.status, name, f"rbee_jupyter/errors.py: class {name}")
            for name, cls in _error_classes().items()]


def _codes_given_in(source: str, where: str) -> list[Raised]:
    """Every ``SomeError(..., code="X"[, status=N])`` of one module: codes given at the raise site."""
    classes = _error_classes()
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
        if name not in classes:
            continue
        kw = {k.arg: k.value.value for k in node.keywords if isinstance(k.value, ast.Constant)}
        if isinstance(kw.get("code"), str):
            status = kw.get("status") if isinstance(kw.get("status"), int) else classes[name].status
            found.append(Raised(kw["code"], status, name, f"{where}:{node.lineno}"))
    return found


def _from_source() -> list[Raised]:
    return [r for path in sorted(PACKAGE.rglob("*.py"))
            for r in _codes_given_in(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE.parent)))]


def _from_http_layer() -> list[Raised]:
    """Tornado's own errors (no token, unknown method, body too large) and what a Python client makes of them."""
    return [Raised(code, status, type(error_from_json({"error": {"code": code, "message": "m"}}, status)).__name__,
                   f"rbee_jupyter/errors.py: HTTP_ERROR_CODES[{status}]")
            for status, code in _HTTP_CODES.items()]


def raised() -> dict[str, list[Raised]]:
    by_code: dict[str, list[Raised]] = {}
    for r in _from_classes() + _from_source() + _from_http_layer():
        by_code.setdefault(r.code, []).append(r)
    return by_code


def test_the_collection_finds_codes_given_at_raise_sites() -> None:
    # The table checks below are only as good as this collection.
    source = ("raise RbeeError('lost', code='LOST_IT', status=502)\n"
              "raise _errors.JobNotFound('gone', details={}, code='GONE')\n"
              "raise InvalidRequest('bad', code=some_variable)\n"
              "QuantState(code='NOT_AN_ERROR')\n")
    assert _codes_given_in(source, "m.py") == [Raised("LOST_IT", 502, "RbeeError", "m.py:1"),
                                               Raised("GONE", 404, "JobNotFound", "m.py:2")]
    codes = raised()
    assert {"MODEL_NOT_FOUND", "QUOTA_EXCEEDED", "INTERNAL_ERROR"} <= codes.keys()  # the classes
    assert {"FORBIDDEN", "BODY_TOO_LARGE"} <= codes.keys()                           # the HTTP layer


def test_every_code_the_package_raises_is_in_the_table() -> None:
    table = documented()
    missing = {code: [r.where for r in rs] for code, rs in raised().items() if code not in table}
    assert not missing, f"codes missing from docs/errors.md (add a row: code, status, class, when, what to do): {missing}"


def test_the_table_lists_no_code_that_no_longer_exists() -> None:
    gone = sorted(set(documented()) - set(raised()))
    assert not gone, f"docs/errors.md lists codes nothing raises any more: {gone}"


def test_each_code_has_one_status_and_the_table_gives_it() -> None:
    table = documented()
    for code, places in raised().items():
        statuses = {r.status for r in places}
        assert len(statuses) == 1, f"{code} is raised with several statuses: {[(r.status, r.where) for r in places]}"
        if code in table:
            assert table[code].status == statuses.pop(), \
                f"docs/errors.md:{table[code].line}: {code} is {table[code].status} there, but {places[0].where} " \
                f"gives {places[0].status}"


def test_the_table_names_the_class_a_python_caller_catches() -> None:
    table = documented()
    for code, places in raised().items():
        if code in table:
            classes = {r.cls for r in places}
            assert table[code].cls in classes, \
                f"docs/errors.md:{table[code].line}: {code} is raised as {sorted(classes)}, not {table[code].cls}"


def _bad_input_cases() -> list:
    # tests/ is on sys.path (the suite imports its own helpers the same way)
    from reliability.test_bad_inputs import CASES

    return CASES


def test_the_answers_of_the_malformed_input_suite_are_documented() -> None:
    # tests/reliability/test_bad_inputs.py checks these answers against a real server.
    table = documented()
    cases = _bad_input_cases()
    assert len(cases) >= 40
    for case in cases:
        code = case.code.upper() if case.path.startswith("openai/") else case.code  # OpenAI's shape: lower case
        assert code in table, f"{case.id}: the server answers {case.code}, which docs/errors.md lacks"
        assert table[code].status == case.status, \
            f"{case.id}: the server answers {case.status} {case.code}; docs/errors.md says {table[code].status}"


_LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("doc", ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))])
def test_links_between_the_documents_lead_to_files_of_the_repository(doc: str) -> None:
    text = (ROOT / doc).read_text(encoding="utf-8")
    for target in _LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:|#", target):  # a URL or an anchor of the same page
            continue
        path = (ROOT / doc).parent / target.split("#")[0]
        assert path.resolve().is_relative_to(ROOT) and path.exists(), f"{doc} links to {target}, which is not in the repository"


def test_the_readme_points_to_the_error_table() -> None:
    assert "](docs/errors.md)" in (ROOT / "README.md").read_text(encoding="utf-8")


# Made of pieces so that this file does not match itself.
_OUTSIDE = re.compile(b"shared" + b"/|DESIGN" + b".md")


def _project_files() -> list[Path]:
    """What the project is: files git tracks plus new ones it does not ignore; every file without git."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True, timeout=60).stdout.decode()
    except (OSError, subprocess.SubprocessError):
        return [p for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts]
    return [ROOT / name for name in out.split("\0") if name and (ROOT / name).is_file()]


def test_no_file_points_outside_the_repository() -> None:
    files = _project_files()
    assert len(files) > 50 and ROOT / "README.md" in files
    hits = []
    for path in files:
        for n, line in enumerate(path.read_bytes().splitlines(), 1):
            if _OUTSIDE.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.decode(errors='replace').strip()[:120]}")
    assert not hits, "references to files a user of the package does not have (point to docs/errors.md, " \
                     "a README section, or drop them):\n" + "\n".join(hits)
