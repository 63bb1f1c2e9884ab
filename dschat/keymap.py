"""The `[keys]` table of the config file, checked before the TUI starts: every action must be one the TUI
binds and every key a name Textual knows, so a typo is one line on stderr instead of a binding that never
fires (which can take Ctrl+Q away)."""

from __future__ import annotations

from pathlib import Path

from textual.keys import KEY_NAME_REPLACEMENTS, Keys, key_to_character

from .config import ConfigError

MODIFIERS = {"ctrl", "shift", "alt", "meta", "super", "hyper"}
NAMED_KEYS = {k.value for k in Keys if "+" not in k.value and not k.value.startswith("<")} | \
    set(KEY_NAME_REPLACEMENTS.values())


def known_key(key: str) -> bool:
    """Whether `key` ("ctrl+s", "f2", "question_mark", "?") names a key Textual can report."""
    *modifiers, name = key.strip().split("+")
    if any(m not in MODIFIERS for m in modifiers):
        return False
    return (len(name) == 1 and name.isprintable()) or name in NAMED_KEYS or key_to_character(name) is not None


def check_keymap(keymap: dict, actions: set[str], path: Path | None):
    """Raise a ConfigError naming the first unknown action or key of `keymap` (action -> "key,key")."""
    where = f"{path}: [keys]" if path else "[keys]"
    for action, keys in keymap.items():
        if action not in actions:
            raise ConfigError(f"{where} {action}: no such action (these can be rebound: {', '.join(sorted(actions))})")
        bad = next((k for k in keys.split(",") if not known_key(k)), None)
        if bad is not None:
            raise ConfigError(f"{where} {action} = {keys!r}: {bad.strip()!r} is not a key name "
                              "(e.g. \"ctrl+s\", \"f2\", \"escape\")")
