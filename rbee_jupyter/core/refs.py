"""Model references: the one string form users type everywhere (HTTP, magics, client).

Accepted forms::

    hf:org/repo                    a hub repository at its default branch
    hf:org/repo@revision           ... at a branch, tag or commit
    hf:org/repo/file.gguf[@rev]    one GGUF file of a hub repository (imported on load)
    file:///abs/path               a local folder (config.json + safetensors), used in place
    file:///abs/path/file.gguf     a local GGUF file (imported on load)

Hub ids are checked the way the hub checks them, so a typo fails here with a clear
message instead of as a confusing 404 later.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal
from urllib.parse import quote, unquote

from ..errors import InvalidModelRef

ACCEPTED_FORMS = ["hf:org/repo", "hf:org/repo@revision", "hf:org/repo/file.gguf", "file:///absolute/path"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_REVISION = re.compile(r"^[A-Za-z0-9._/-]{1,256}$")
_MAX_NAME = 96


@dataclass(frozen=True)
class ModelRef:
    """A parsed, normalised reference; ``str()`` gives the canonical form."""

    scheme: Literal["hf", "file"]
    repo_id: str | None = None
    revision: str | None = None
    path: str | None = None
    filename: str | None = None

    def __str__(self) -> str:
        if self.scheme == "file":  # percent-encoded, so that parsing it again gives this path back
            return f"file://{quote(self.path or '', safe='/+@,=:~')}"
        text = f"hf:{self.repo_id}"
        if self.filename:
            text += f"/{self.filename}"
        if self.revision:
            text += f"@{self.revision}"
        return text

    @property
    def is_gguf(self) -> bool:
        name = self.filename or (self.path or "")
        return name.lower().endswith(".gguf")

    @property
    def display_name(self) -> str:
        """A short name for tables and the OpenAI ``model`` field."""
        if self.scheme == "hf":
            return str(self).removeprefix("hf:")
        return PurePosixPath(self.path or "").name


def _invalid(value: object, why: str) -> InvalidModelRef:
    shown = repr(value) if not isinstance(value, str) or len(value) <= 200 else repr(value[:200] + "…")
    return InvalidModelRef(
        f"Invalid model reference {shown}: {why}. Accepted forms: {', '.join(ACCEPTED_FORMS)}.",
        details={"model_ref": value if isinstance(value, str) and len(value) <= 1000 else None,
                 "accepted_forms": ACCEPTED_FORMS},
    )


def validate_repo_name(part: str, value: str) -> None:
    """One segment of a repo id, with the hub's rules (no ``..``/``--``, no leading/trailing ``-``/``.``)."""
    if not part:
        raise _invalid(value, "the repository id has an empty part")
    if len(part) > _MAX_NAME:
        raise _invalid(value, f"a repository name is at most {_MAX_NAME} characters")
    if not _NAME.match(part):
        raise _invalid(value, "repository names use only letters, digits, '-', '_' and '.', "
                              "and start with a letter or digit")
    if ".." in part or "--" in part:
        raise _invalid(value, "'..' and '--' are not allowed in repository names")
    if part[-1] in "-.":
        raise _invalid(value, "a repository name cannot end with '-' or '.'")


def _parse_hf(body: str, value: str) -> ModelRef:
    revision = None
    if "@" in body:
        body, revision = body.rsplit("@", 1)
        if not revision or not _REVISION.match(revision) or ".." in revision or revision.startswith("/") \
                or revision.endswith("/"):
            raise _invalid(value, "the revision must be a branch, tag or commit name")
    parts = body.split("/")
    filename = None
    if len(parts) > 2 and parts[-1].lower().endswith(".gguf"):
        filename = "/".join(parts[2:])
        parts = parts[:2]
        for segment in filename.split("/"):
            if segment in ("", ".", "..") or not re.match(r"^[A-Za-z0-9._+-]+$", segment):
                raise _invalid(value, "the GGUF file name is not a plain relative path")
    if len(parts) not in (1, 2):
        raise _invalid(value, "a hub repository id is 'org/repo'")
    for part in parts:
        validate_repo_name(part, value)
    return ModelRef("hf", repo_id="/".join(parts), revision=revision, filename=filename)


def _parse_file(rest: str, value: str) -> ModelRef:
    if not rest.startswith("///"):
        raise _invalid(value, "a local path is written file:///absolute/path (three slashes)")
    path = unquote(rest[2:])
    if "\x00" in path:
        raise _invalid(value, "the path contains a NUL character")
    segments = path.split("/")
    if any(s in ("..", ".") for s in segments):
        raise _invalid(value, "the path may not contain '.' or '..' segments")
    normal = "/" + "/".join(s for s in segments if s)
    if normal == "/":
        raise _invalid(value, "the path is empty")
    return ModelRef("file", path=normal.rstrip("/") or "/")


def parse_ref(value: object) -> ModelRef:
    """Parse and validate a model reference.

    Args:
        value: what the user sent; anything that is not a string is rejected.

    Returns:
        The normalised ``ModelRef``.

    Raises:
        InvalidModelRef: (400) naming the accepted forms.
    """
    if not isinstance(value, str):
        raise _invalid(value, "it must be a string")
    if not value or len(value) > 2048:
        raise _invalid(value, "it is empty" if not value else "it is too long")
    if any(c.isspace() for c in value) or any(ord(c) < 32 for c in value):
        raise _invalid(value, "it contains spaces or control characters")
    scheme, sep, rest = value.partition(":")
    if not sep:
        raise _invalid(value, "it has no scheme ('hf:' or 'file:')")
    if scheme == "hf":
        return _parse_hf(rest, value)
    if scheme == "file":
        return _parse_file(rest, value)
    raise _invalid(value, f"unknown scheme {scheme!r}")
