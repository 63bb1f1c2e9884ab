"""The corpus: the .py files of this interpreter's standard library, and which of them are held out.

Every 20th module, by a stable hash of its path, is held out for evaluation (its code is never trained on,
not even inside a chat answer)."""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "lib2to3", "turtledemo", "idlelib", "ensurepip",
             "venv"}
TEST_DIRS = {"test", "tests", "idle_test"}
TINY_FILES = 40  # --tiny: the first files only


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_test(rel: str) -> bool:
    parts = Path(rel).parts
    return bool(set(parts[:-1]) & TEST_DIRS) or parts[-1].startswith("test_")


def held_out(rel: str) -> bool:
    return int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 20 == 0


def stdlib_files(limit: int | None = None, tests: bool = True) -> list[tuple[str, str]]:
    """(relative path, text) of the standard library's .py files, sorted; its own test suite too when `tests`."""
    root = stdlib_root()
    rels = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)  # never walk into site-packages
        rels += [os.path.relpath(os.path.join(folder, n), root) for n in names if n.endswith(".py")]
    rels = sorted(r for r in rels if tests or not is_test(r))
    out = []
    for rel in rels[:limit] if limit else rels:
        try:
            out.append((rel, (root / rel).read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    return out


def split(files: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(training files, held-out files): held-out files exclude the library's tests; a corpus too small to
    hold any out (--tiny) evaluates on its first two files."""
    train = [f for f in files if not held_out(f[0])]
    test = [f for f in files if held_out(f[0]) and not is_test(f[0])] or files[:2]
    return train, test


def is_held_out_source(path: str | None) -> bool:
    """Whether a module's source file (an absolute path from `inspect`) is a held-out library file."""
    if not path:
        return False
    try:
        return held_out(str(Path(path).relative_to(stdlib_root())))
    except ValueError:
        return False
