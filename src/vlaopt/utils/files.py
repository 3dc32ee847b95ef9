"""Reading the YAML and JSON files users hand us, with one error naming the file (and the line)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

YAML_SUFFIXES = (".yaml", ".yml")


def _text(path: Path, what: str, allow_empty: bool) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    text = path.read_text()
    if not text.strip() and not allow_empty:
        raise ValueError(f"{what} {path} is empty")
    return text


def read_yaml(path: str | Path, what: str, allow_empty: bool = False) -> Any:
    """The parsed YAML of `path` (None for an empty file when `allow_empty`); a missing, empty or
    malformed file raises one error naming it, with the line and column of a syntax error."""
    path = Path(path)
    text = _text(path, what, allow_empty)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ValueError(f"{what} {path} is not valid YAML{where}: {problem}") from None


def read_json(path: str | Path, what: str) -> Any:
    """The parsed JSON of `path`; a missing, empty, truncated or malformed file raises one error
    naming it and where parsing stopped."""
    path = Path(path)
    text = _text(path, what, allow_empty=False)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} {path} is not valid JSON (truncated or damaged?) at line {error.lineno}, "
                         f"column {error.colno}: {error.msg}") from None


def read_config_file(path: str | Path, what: str) -> Any:
    """YAML for a `.yaml` / `.yml` file, JSON otherwise."""
    return read_yaml(path, what) if Path(path).suffix in YAML_SUFFIXES else read_json(path, what)
