"""What a user's `pip install .` gives dschat: the distributions its declared requirements pull in (no extras),
read from the installed metadata. tests/test_dependencies.py checks that dschat imports nothing outside them;
`.ci/run` builds a second virtual environment of exactly them (hard links into this one's files, so no wheel is
unpacked again) and runs dschat there as a user would, without the test extra."""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import shutil
import sys
from pathlib import Path


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str = "dschat", extras: tuple[str, ...] = ()) -> set[str]:
    """Normalised names of `root` and every distribution its requirements (with `extras`) need, transitively,
    as installed here; a requirement whose marker does not hold here is left out, as pip leaves it out."""
    from packaging.requirements import Requirement  # pip's own parser (packaging comes with the test extra)

    seen: set[str] = set()
    todo = [(root, set(extras))]
    while todo:
        name, wanted = todo.pop()
        key = (_norm(name), frozenset(wanted))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        for line in dist.requires or []:
            req = Requirement(line)
            envs = [{"extra": e} for e in wanted] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, set(req.extras)))
    return {name for name, _ in seen}


def distributions_of_modules(modules) -> dict[str, set[str]]:
    """Top-level module name -> the normalised names of the installed distributions that provide it."""
    table = md.packages_distributions()
    return {m: {_norm(d) for d in table.get(m, [])} for m in modules}


def link_environment(target: Path, names: set[str]):
    """Put the installed files of the distributions `names` (not dschat itself) into the virtual environment
    `target`'s site-packages, hard-linked (copied across file systems); scripts are left out."""
    site = Path(next(p for p in sys.path if p.endswith("site-packages")))
    dest_site = next((target / "lib").glob("python*/site-packages"))
    for dist in md.distributions():
        name = _norm(dist.metadata["Name"])
        if name not in names or name == "dschat":
            continue
        for f in dist.files or []:
            src = Path(dist.locate_file(f)).resolve()
            try:
                rel = src.relative_to(site.resolve())
            except ValueError:
                continue  # a script in bin/, a file outside site-packages
            out = dest_site / rel
            if out.exists() or not src.is_file():
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, out)
            except OSError:
                shutil.copy2(src, out)


if __name__ == "__main__":  # python -m dschat.dev.install TARGET_VENV
    link_environment(Path(sys.argv[1]), closure())
