"""The user's settings: `$XDG_CONFIG_HOME/dschat/config.toml` (default ~/.config/dschat/config.toml).

    model = "deepseek-ai/DeepSeek-V2-Lite-Chat"   # default model (DSCHAT_MODEL and --model win)
    system = "You are a concise assistant."
    theme = "deepseek-dark"
    code_style = "monokai"                        # Pygments style of code blocks (default: the theme's)
    temperature = 0.3
    top_p = 0.95
    max_tokens = 2048
    quant = "int4"                                # int8 / int4 weights (--quant wins)

    [keys]                                        # TUI key bindings, action = "key"
    stop = "escape"
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from .files import atomic_write_text
from .paths import xdg

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

QUANTS = ("int8", "int4", "none")  # the `quant` setting (dschat.engine.quant checks the flag)


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
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"{path}: cannot read the config file ({e})") from None
        known = {f for f in cls.__dataclass_fields__ if f != "path"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown setting {unknown[0]!r}")
        types = {"temperature": (int, float), "top_p": (int, float), "top_k": int, "max_tokens": int,
                 "keys": dict}
        for k, v in data.items():
            want = types.get(k, str)
            if not isinstance(v, want) or isinstance(v, bool):
                raise ConfigError(f"{path}: setting {k!r} has the wrong type ({type(v).__name__})")
        if data.get("quant", "none") not in QUANTS:
            raise ConfigError(f"{path}: setting 'quant' is {data['quant']!r} (use {', '.join(QUANTS)})")
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
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "\n".join(lines) + "\n")


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    s = str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{s}"'
