"""The user's settings: `$XDG_CONFIG_HOME/dschat/config.toml` (default ~/.config/dschat/config.toml).

    model = "deepseek-ai/DeepSeek-V2-Lite-Chat"   # default model (DSCHAT_MODEL and --model win)
    system = "You are a concise assistant."
    theme = "deepseek-dark"
    code_style = "monokai"                        # Pygments style of code blocks (default: the theme's)
    temperature = 0.3
    top_p = 0.95
    max_tokens = 2048
    quant = "int4"                                # int8 / int4 weights (--quant wins)
    threads = 2                                   # CPU threads (--threads wins; default: chosen per model)
    compile = "on"                                # compile the CPU decode step (--compile wins; default auto)

    [keys]                                        # TUI key bindings, action = "key"
    stop = "escape"
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dschat.files import UnreadableFile, atomic_write_text, read_regular
from dschat.settings.paths import PRIVATE_DIR, PRIVATE_FILE, private_dir, xdg
from dschat.settings.checks import QUANTS, problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MAX_CONFIG_BYTES = 2**20  # a config file larger than this is a mistake (it is read at every start)


class ConfigError(Exception):
    pass


@dataclass
class Settings:
    model: str | None = None
    system: str | None = None
    theme: str | None = None
    code_style: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    device: str | None = None
    dtype: str | None = None
    quant: str | None = None
    threads: int | None = None
    compile: str | None = None
    keys: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    @classmethod
    def path_default(cls) -> Path:
        return xdg("CONFIG") / "config.toml"

    @classmethod
    def load(cls, path: Path | None = None) -> "Settings":
        path = path or cls.path_default()
        if not path.exists():
            return cls(path=path)
        text = ""
        try:
            text = read_regular(path, MAX_CONFIG_BYTES).decode("utf-8")
            data = tomllib.loads(text)
        except UnreadableFile as e:  # a FIFO, a directory, a huge file
            raise ConfigError(f"{e} (the config file)") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"{path}: cannot read the config file ({e}){_bad_line(text, e)}") from None
        problem_text = _problem(data, {f for f in cls.__dataclass_fields__ if f != "path"})
        if problem_text:
            raise ConfigError(f"{path}: {problem_text}")
        return cls(**data, path=path)

    def save(self, **changes):
        """Write changed settings back, atomically (other settings and comments are kept)."""
        path = self.path or self.path_default()
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        for key, value in changes.items():
            setattr(self, key, value)
            rendered = f"{key} = {_toml_value(value)}"
            for i, line in enumerate(lines):
                if line.split("=", 1)[0].strip() == key and not line.lstrip().startswith("#"):
                    lines[i] = rendered
                    break
            else:
                # top-level keys must come before any [table]
                at = next((i for i, line in enumerate(lines) if line.lstrip().startswith("[")), len(lines))
                lines.insert(at, rendered)
        if path.parent == xdg("CONFIG"):
            private_dir("CONFIG")
        path.parent.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        atomic_write_text(path, "\n".join(lines) + "\n", mode=PRIVATE_FILE)


def _problem(data: dict, known: set[str]) -> str | None:
    """What is wrong with the settings read (naming the first bad one), or None."""
    unknown = sorted(set(data) - known)
    if unknown:
        return f"unknown setting {unknown[0]!r}"
    types = {"temperature": (int, float), "top_p": (int, float), "top_k": int, "max_tokens": int, "threads": int, "keys": dict}
    for k, v in data.items():
        if not isinstance(v, types.get(k, str)) or isinstance(v, bool):
            return f"setting {k!r} has the wrong type ({type(v).__name__})"
        if problem(k, v):
            return f"setting {k!r} = {v!r}: {problem(k, v)}"
    bad_key = next((a for a, key in data.get("keys", {}).items() if not isinstance(key, str)), None)
    if bad_key is not None:
        return f'[keys] {bad_key} must be a key name in quotes, e.g. "ctrl+s"'
    if data.get("quant", "none") not in QUANTS:
        return f"setting 'quant' is {data['quant']!r} (use {', '.join(QUANTS)})"
    return None


def _bad_line(text: str, e: Exception) -> str:
    """`: the line` a TOML error points at (`temperature = null`), so that the message names the setting."""
    at = re.search(r"at line (\d+)", str(e))
    lines = text.splitlines() if isinstance(e, tomllib.TOMLDecodeError) and at else []
    n = int(at.group(1)) if at else 0
    return f": {lines[n - 1].strip()[:80]}" if 0 < n <= len(lines) and lines[n - 1].strip() else ""


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    s = str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{s}"'
