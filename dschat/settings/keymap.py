"""The `[keys]` table of the config file, checked before the TUI starts: every action must be one the TUI
binds and every key a name Textual knows, so a typo is one line on stderr instead of a binding that never
fires (which can take Ctrl+Q away)."""

from __future__ import annotations

from pathlib import Path

from textual.keys import KEY_NAME_REPLACEMENTS, Keys, key_to_character

from dschat.settings.config import ConfigError

MODIFIERS = {"ctrl", "shift", "alt", "meta", "super", "hyper"}
NAMED_KEYS = {k.value for k in Keys if "+" not in k.value and not k.value.startswith("<")} | \
    set(KEY_NAME_REPLACEMENTS.values())


def known_key(key: str) -> bool:
    """Whether `key` ("ctrl+s", "f2", "question_mark", "?") names a key Textual can report."""
    *modifiers, name = key.strip().split("+")
    if any(m not in MODIFIERS for m in modifiers):
        return False
    return (len(name) == 1 and name.isprintable()) or name in NAMED_KEYS or key_to_character(name) is not None


def _keys(keys: str) -> list[str]:
    return [k.strip() for k in keys.split(",") if k.strip()]


def check_keymap(keymap: dict, actions: dict[str, str], path: Path | None):
    """Raise a ConfigError naming the first unknown action or key of `keymap` (action -> "key,key"), or a key
    it gives one action while another action (rebound or not; `actions` maps each to its default keys) keeps
    it: `help = "ctrl+q"` would take Quit away unless quit is rebound too."""
    where = f"{path}: [keys]" if path else "[keys]"
    for action, keys in keymap.items():
        if action not in actions:
            raise ConfigError(f"{where} {action}: no such action (these can be rebound: {', '.join(sorted(actions))})")
        bad = next((k for k in keys.split(",") if not known_key(k)), None)
        if bad is not None:
            raise ConfigError(f"{where} {action} = {keys!r}: {bad.strip()!r} is not a key name "
                              "(e.g. \"ctrl+s\", \"f2\", \"escape\")")
    effective = {a: _keys(keymap.get(a, default)) for a, default in actions.items()}
    for action, keys in keymap.items():
        for key in _keys(keys):
            other = next((a for a, ks in effective.items() if a != action and key in ks), None)
            if other is not None:
                how = "rebind it too" if other in keymap else f"rebind {other} too (e.g. {other} = \"f10\")"
                raise ConfigError(f"{where} {action} = {keys!r}: {key} is {other}'s key; choose another key, or "
                                  f"{how}")
