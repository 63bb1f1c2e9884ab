"""The allowed values of the settings that flags and the config file share. One check per setting, used by
both (dschat.settings.config for the file, dschat.runtime for the flags), so a bad value is one line naming it before
any model loads or conversation is created."""

from __future__ import annotations

import math
import re

DEVICE = re.compile(r"(auto|cpu|mps|cuda(:\d+)?)$")
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTS = ("int8", "int4", "none")
SEED_RANGE = (0, 2**63 - 1)


def _number(value, low: float, high: float, *, above_low: bool = False, integer: bool = False) -> str | None:
    """Why `value` is not a number in [low, high] ((low, high] with above_low; whole with integer), or None."""
    kind = "a whole number" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return f"must be {kind}"
    if math.isfinite(value) and (low < value if above_low else low <= value) and value <= high:
        return None
    lower = f"above {low}" if above_low else f"at least {low}"
    return f"must be {kind} {lower}" + ("" if high == math.inf else f" and at most {high}")


def _choice(value, pattern: re.Pattern | None, choices: tuple[str, ...], what: str) -> str | None:
    if isinstance(value, str) and (pattern.match(value) if pattern else value in choices):
        return None
    return f"not {what}"


CHECKS = {
    "temperature": lambda v: _number(v, 0, 100),  # 0 = greedy
    "top_p": lambda v: _number(v, 0, 1, above_low=True),
    "top_k": lambda v: _number(v, 0, math.inf, integer=True),  # 0 = no limit
    "max_tokens": lambda v: _number(v, 1, math.inf, integer=True),
    "seed": lambda v: _number(v, *SEED_RANGE, integer=True),
    "cache_gb": lambda v: _number(v, 0, 1e6, above_low=True),
    "draft_tokens": lambda v: _number(v, 1, 64, integer=True),
    "threads": lambda v: _number(v, 1, 4096, integer=True),
    "device": lambda v: _choice(v, DEVICE, (), "a device (cpu, cuda, cuda:N, mps or auto)"),
    "dtype": lambda v: _choice(v, None, DTYPES, f"a dtype ({', '.join(DTYPES)})"),
    "quant": lambda v: _choice(v, None, QUANTS, "a quantization (int8, int4 or none)"),
    "compile": lambda v: _choice(v, None, ("auto", "on", "off"), "auto, on or off"),
}


def problem(name: str, value) -> str | None:
    """Why `value` is not allowed for the setting `name` ("must be a number from 0 to 100"), or None."""
    check = CHECKS.get(name)
    return check(value) if check and value is not None else None
