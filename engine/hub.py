"""Where a model's files are: a local directory, or a hub repo id resolved through huggingface_hub's cache
(downloaded when missing, saying first what will be fetched). Each way it can fail is its own ModelError."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from .errors import ModelError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


TOKENIZER_FILES = ["tokenizer*", "*.jinja"]
MODEL_FILES = ["*.json", "*.safetensors", *TOKENIZER_FILES]


def _rank() -> int:
    """This process's rank; 0 where torch was never imported (nothing can have started a process group)."""
    if "torch" not in sys.modules:
        return 0
    from .dist import rank

    return rank()


DEMO = "demo"  # the name of the tiny demo model that ships inside the dschat distribution


def demo_dir() -> Path:
    """The bundled demo model's directory (package data of the installed distribution, not an app module)."""
    from importlib.resources import files

    return Path(str(files("dschat") / "demo_model"))


def resolve(path_or_id: str | os.PathLike, tokenizer_only: bool = False, download: bool = True) -> Path:
    """A local model directory, `demo` (the bundled demo model, as `--model demo`), or a hub repo id: from the
    local HF cache, else downloaded (unless offline, or `download` is False), saying first what will be fetched.
    tokenizer_only: the tokenizer's files are all that is wanted (a hub id then never starts a download of the
    weights)."""
    p = Path(path_or_id).expanduser()
    if str(path_or_id) == DEMO:  # as on dschat's command line: a folder named demo is ./demo
        return demo_dir()
    if p.exists():
        if not p.is_dir():
            raise ModelError(f"{p}: not a model directory")
        return p
    name = str(path_or_id)
    if not _REPO_ID.match(name) or name.startswith((".", "/", "~")):
        raise ModelError(f"{p}: no such model directory")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import HfHubHTTPError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise ModelError(f"{name}: no such directory, and huggingface_hub is not installed") from None
    # Read the cache location and offline switch now, not when huggingface_hub was first imported.
    cache_dir = os.environ.get("HF_HUB_CACHE") or (
        os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    patterns = TOKENIZER_FILES if tokenizer_only else MODEL_FILES
    wanted = "tokenizer.json" if tokenizer_only else "config.json"

    def fetch(**kw) -> Path | list:
        return snapshot_download(name, cache_dir=cache_dir, allow_patterns=patterns, **kw)

    try:
        cached = Path(fetch(local_files_only=True))
        if (cached / wanted).exists() and (tokenizer_only or any(cached.glob("*.safetensors"))):
            return cached
    except (HfHubHTTPError, OSError, ValueError):
        pass  # not cached (in full)
    if offline:
        raise ModelError(f"{name}: not a local directory, and not in the local Hugging Face cache (HF_HUB_OFFLINE "
                         f"is set; looked for {', '.join(patterns)})")
    if not download:
        raise ModelError(f"{name}: not a local directory, and not in the Hugging Face cache")
    try:
        if _rank() == 0:
            sys.stderr.write(_download_note(name, fetch, tokenizer_only))
        return Path(fetch())
    except (HfHubHTTPError, OSError, ValueError) as e:
        if _cause(e, lambda c: isinstance(c, RepositoryNotFoundError)) is not None:
            raise ModelError(f"{name}: not a local directory, and no such model on the Hugging Face hub (or it is "
                             f"private: log in with `hf auth login`)") from None
        cause = _cause(e, lambda c: any(k.__name__ in _NETWORK_ERRORS for k in type(c).__mro__))
        if cause is not None:
            raise ModelError(f"{name}: not a local directory or in the local Hugging Face cache, and the hub could "
                             f"not be reached ({type(cause).__name__}: {_first_line(cause)})") from None
        raise ModelError(f"{name}: not a local directory, and the Hugging Face hub could not provide it "
                         f"({_first_line(e)})") from None


_NETWORK_ERRORS = {"TransportError", "ConnectionError", "Timeout", "TimeoutException", "timeout", "gaierror"}


def _cause(e: BaseException | None, matches) -> BaseException | None:
    """`e` or the first error under it (huggingface_hub raises its own errors from the real ones) that matches:
    a missing repository, or a network error (httpx's or requests' connection errors, a timeout, a name that
    did not resolve: _NETWORK_ERRORS)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if matches(e):
            return e
        e = e.__cause__ or e.__context__
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _download_note(name: str, fetch, tokenizer_only: bool) -> str:
    """What a download of `name` will fetch: its files and their size (when the hub can say)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    what = "its tokenizer" if tokenizer_only else "its config, tokenizer and weights"
    quiet = are_progress_bars_disabled()
    disable_progress_bars()  # a dry run needs no progress bar
    try:
        plan = [f for f in fetch(dry_run=True) if f.will_download]
    except TypeError:  # a huggingface_hub without dry runs
        return f"Downloading {name} ({what}) from the Hugging Face hub\n"
    finally:
        if not quiet:
            enable_progress_bars()
    size = sum(f.file_size or 0 for f in plan)
    return f"Downloading {name} ({what}) from the Hugging Face hub: {len(plan)} files, {_bytes(size)}\n"


def _bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"
