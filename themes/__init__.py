"""TUI themes: TOML files with the fields of textual.theme.Theme (name, primary, secondary, accent,
foreground, background, surface, panel, success, warning, error, dark, and a [variables] table).

Ours live beside this file; a user's go in $XDG_CONFIG_HOME/dschat/themes/*.toml and may override ours.
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

HERE = Path(__file__).resolve().parent

COLOURS = ("primary", "secondary", "accent", "foreground", "background", "surface", "panel", "success", "warning",
           "error")
FIELDS = ("name", *COLOURS, "dark", "variables")


class ThemeError(Exception):
    pass


def read_theme(path: Path):
    from textual.color import Color
    from textual.theme import Theme

    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ThemeError(f"{path}: not a readable theme ({e})") from None
    unknown = sorted(set(data) - set(FIELDS))
    if unknown or "primary" not in data:
        raise ThemeError(f"{path}: " + (f"unknown field {unknown[0]!r}" if unknown else "needs a primary colour"))
    data.setdefault("name", path.stem)
    for key, value in data.items():
        if key in COLOURS:
            try:
                Color.parse(value)
            except Exception:
                raise ThemeError(f"{path}: {key} = {value!r} is not a colour") from None
    try:
        return Theme(**data)
    except Exception as e:
        raise ThemeError(f"{path}: {e}") from None


def load_themes(user_dir: Path | None = None) -> tuple[list, list[str]]:
    """(themes, problems): ours, then the user's (a broken user file is reported, not fatal)."""
    themes, problems = [], []
    for directory in (HERE, user_dir):
        if directory is None or not directory.is_dir():
            continue
        for path in sorted(directory.glob("*.toml")):
            try:
                themes.append(read_theme(path))
            except ThemeError as e:
                if directory == HERE:
                    raise
                problems.append(str(e))
    return themes, problems
