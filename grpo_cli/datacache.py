"""A disk cache of generated reasoning-gym rows: recipe=countdown's 20,000 problems take about 80 s
to generate on a CPU and under a second to read back.

A file holds the rows of one (task, size, seed, task_args) under one Python and one version of
reasoning-gym and of each package it depends on (its generators use sympy, for one); its name is a
hash of all of these, so a change of any of them reads another file. Layout: a header line (the
key, the row count and the SHA-256 of the rest), then one JSON line per row. A file whose header or
checksum does not match is ignored and written again; files are replaced atomically, so a reader
never sees half of one.

Rows are stored so that they read back exactly, Python types included: reasoning-gym's `metadata`,
which its scorers read, holds tuples and dicts with int keys, which plain JSON would turn into lists
and string keys. Rows holding a type this encoding does not know are not cached but generated afresh
(of 106 tasks, only knights_knaves, whose metadata holds numpy strings).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FORMAT = 1  # bump when the layout or the encoding changes
_TUPLE, _DICT = "~tuple", "~dict"  # tags of encoded tuples and of dicts JSON cannot hold as they are


class Uncacheable(TypeError):
    """A value the encoding cannot store exactly."""


def encode(value: Any) -> Any:
    """`value` as plain JSON data from which `decode` rebuilds it exactly (types included)."""
    kind = type(value)
    if value is None or kind in (bool, int, str, float):  # exact types: no subclasses (numpy scalars)
        return value
    if kind is list:
        return [encode(x) for x in value]
    if kind is tuple:
        return {_TUPLE: [encode(x) for x in value]}
    if kind is dict:
        if all(type(k) is str and not k.startswith("~") for k in value):
            return {k: encode(v) for k, v in value.items()}
        return {_DICT: [[encode(k), encode(v)] for k, v in value.items()]}
    raise Uncacheable(f"cannot store a {kind.__name__}")


def decode(value: Any) -> Any:
    if type(value) is list:
        return [decode(x) for x in value]
    if type(value) is dict:
        if len(value) == 1 and _TUPLE in value:
            return tuple(decode(x) for x in value[_TUPLE])
        if len(value) == 1 and _DICT in value:
            return {decode(k): decode(v) for k, v in value[_DICT]}
        return {k: decode(v) for k, v in value.items()}
    return value


def cache_key(task: str, size: int, seed: int, task_args: dict[str, Any]) -> dict[str, Any]:
    """Everything the generated rows depend on."""
    return {
        "format": FORMAT, "task": task, "size": size, "seed": seed, "task_args": encode(dict(task_args)),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        # The installed distribution's version: reasoning_gym.__version__ lags behind it (0.1.19 in 0.1.25).
        "reasoning_gym": _version("reasoning_gym"),
        "dependencies": {name: _version(name) for name in _requirements("reasoning_gym")},
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _requirements(package: str) -> list[str]:
    """The names of the packages `package` always needs (not those of its optional extras), sorted."""
    names = set()
    for requirement in metadata.requires(package) or []:
        if "extra ==" in requirement:  # cli, server, test: they generate nothing
            continue
        name = requirement.split(";")[0].strip()
        for stop in "<>=!~[ (":
            name = name.split(stop)[0]
        names.add(name)
    return sorted(names)


class RowCache:
    """The cache file of one task's rows under `root` (e.g. ~/.cache/grpo): `read()` them, or
    `write(rows)` once generated. task_args the encoding cannot store name no file: nothing is cached."""

    def __init__(self, root: Path, task: str, size: int, seed: int, task_args: dict[str, Any]) -> None:
        try:
            self.key: dict[str, Any] | None = cache_key(task, size, seed, task_args)
        except Uncacheable:
            self.key = None
        self.path: Path | None = None
        if self.key is not None:
            digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:24]
            self.path = root / "reasoning_gym" / f"{task}-{digest}.jsonl"

    def read(self) -> list[dict[str, Any]] | None:
        """The stored rows; None when there is no file or it is not whole (then logged)."""
        if self.path is None:
            return None
        try:
            data = self.path.read_bytes()
        except OSError:
            return None
        try:
            head, _, body = data.partition(b"\n")
            header = json.loads(head)
            if header.get("key") != self.key or hashlib.sha256(body).hexdigest() != header.get("sha256"):
                raise ValueError("key or checksum mismatch")
            *lines, end = body.decode("ascii").split("\n")
            if end:
                raise ValueError("no line break at the end")
            rows = [decode(json.loads(line)) for line in lines]
            if len(rows) != header["rows"] or not all(type(row) is dict for row in rows):
                raise ValueError("row count mismatch")
        except (ValueError, TypeError, AttributeError, KeyError):
            logger.warning("ignoring a damaged dataset cache file %s: generating its rows again", self.path)
            return None
        return rows

    def write(self, rows: list[dict[str, Any]]) -> bool:
        """Store `rows` atomically; False when they cannot be stored exactly or the file cannot be
        written (the caller has its rows either way: the cache only saves time)."""
        from grpo_cli.runs import atomic_write_text

        if self.path is None or self.key is None:
            return False
        try:
            # ASCII: every other character escaped (a lone surrogate too), so no line break inside a
            # row. NaN and infinities are written as JSON's NaN / Infinity, which json reads back.
            lines = [json.dumps(encode(row)) for row in rows]
        except Uncacheable as e:
            logger.info("not caching %s rows: %s", self.key["task"], e)
            return False
        body = "".join(line + "\n" for line in lines)
        header = {"key": self.key, "rows": len(rows), "sha256": hashlib.sha256(body.encode("ascii")).hexdigest()}
        try:
            atomic_write_text(self.path, json.dumps(header) + "\n" + body)
        except OSError as e:
            logger.warning("could not write the dataset cache %s (%s); its rows are generated again next time",
                           self.path, e)
            return False
        return True
