"""Running a model for the app: the typed options of one run (flags over the config file), which model
(the bundled demo when none is named), which device, loading the engine, the settings a ChatSession gets
(session_settings), and the statistics line of `--stats`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from dschat.settings.config import Settings
from dschat.errors import UsageError
from dschat.settings.checks import CHECKS, problem
from dschat.signals import start_up_done

NO_MODEL = (
    "no model given. Get one with `hf download deepseek-ai/DeepSeek-V2-Lite-Chat`, then run "
    "`dschat --model deepseek-ai/DeepSeek-V2-Lite-Chat` (or a local directory), or set DSCHAT_MODEL"
)
DEMO_DIR = Path(__file__).resolve().parent / "demo_model"
DEMO_NOTE = (
    "using the bundled demo model (tiny, trained on Python's standard library; not a DeepSeek release). "
    "For a real one: `hf download deepseek-ai/DeepSeek-V2-Lite-Chat`, then --model"
)
@dataclass
class Options:
    """What one run of dschat was asked for: the command line's flags, with the config file beside them
    (a flag left out is None; the config file and the model's defaults fill it in where it is used)."""

    config: Settings = field(default_factory=Settings)
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    fp8: str = "dequant"
    quant: str | None = None
    cache_gb: float | None = None
    threads: int | None = None
    compile: str | None = None
    speculative: str | None = None
    draft_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    max_tokens: int | None = None
    system: str | None = None
    raw: bool = False
    stats: bool = False
    show_thinking: bool = False  # pipe mode: a reasoning model's thinking on stderr
    files: list | None = None  # -f: files for the (first) message
    no_save: bool = False
    continue_latest: bool = False
    conversation: str | None = None
    theme: str | None = None
    server: str | None = None  # --server URL: run on this `dschat serve`
    no_server: bool = False  # --no-server: load the model here even when a server runs

    @classmethod
    def from_args(cls, args: argparse.Namespace, config: Settings) -> "Options":
        """The options a parser produced (each parser defines the flags it takes; the rest keep defaults)."""
        names = {f.name for f in fields(cls)}
        return cls(config=config, **{k: v for k, v in vars(args).items() if k in names}).checked()

    def checked(self) -> "Options":
        """These options, if every flag given has an allowed value (else a UsageError naming the first)."""
        for name in CHECKS:
            value = getattr(self, name, None)
            if problem(name, value):
                raise UsageError(f"--{name.replace('_', '-')} {value}: {problem(name, value)}")
        return self

    @property
    def system_prompt(self) -> str | None:
        """--system, else the config file's."""
        return self.system if self.system is not None else self.config.system

    @property
    def continuing(self) -> bool:
        """-c or --conversation: continue a saved conversation."""
        return self.continue_latest or self.conversation is not None

    def sampling_flags(self) -> dict:
        """The sampling flags given, as saved with a conversation."""
        return {k: getattr(self, k) for k in ("temperature", "top_p", "top_k", "seed", "max_tokens")
                if getattr(self, k) is not None}


def model_name(opts: Options) -> str:
    """--model, then $DSCHAT_MODEL, then the config file, then the bundled demo ("demo" names it)."""
    name = opts.model or os.environ.get("DSCHAT_MODEL") or opts.config.model
    source = "--model" if opts.model else "DSCHAT_MODEL" if os.environ.get("DSCHAT_MODEL") else "model (config file)"
    if name and not name.strip():
        raise UsageError(f"{source} is blank: give a model directory, a hub repo id or `demo`")
    if name and not name.isprintable() and not Path(name).expanduser().is_dir():
        # a directory may be named anything (terminal_text shows it clean); any other name is a typo or a paste
        raise UsageError(f"{source} {name!r}: a model name holds no control characters (a line break?)")
    if name == "demo":
        return str(DEMO_DIR)
    if name:
        return name
    if os.environ.get("DSCHAT_NO_DEMO") or not (DEMO_DIR / "config.json").exists():
        raise UsageError(NO_MODEL)
    sys.stderr.write(f"dschat: {DEMO_NOTE}\n")
    return str(DEMO_DIR)


def default_device(opts: Options) -> str:
    dev = opts.device or opts.config.device
    if dev and dev != "auto":
        return dev
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_engine(opts: Options, progress=None):
    """The engine of this run; `progress` (bytes done, bytes total) as it loads, by default a bar on stderr."""
    from dschat.engine import Engine  # deferred: torch

    name = model_name(opts)
    progress = progress or terminal_progress("Loading " + Path(name).name)
    engine = Engine.from_pretrained(name, device=default_device(opts),
                                    dtype=opts.dtype or opts.config.dtype, cache_gb=opts.cache_gb,
                                    speculative=opts.speculative, draft_tokens=opts.draft_tokens,
                                    progress=progress, fp8=opts.fp8, quant=quant_name(opts),
                                    threads=opts.threads or opts.config.threads,
                                    compile=opts.compile or opts.config.compile or "auto")
    start_up_done()  # a Ctrl+C during start-up stops here, even one that torch's import swallowed
    return engine


def terminal_progress(label: str):
    """A progress bar on stderr for the engine's (bytes done, bytes total) calls, when stderr is a terminal (rank
    0's, with several ranks); silent otherwise."""
    if not sys.stderr.isatty() or int(os.environ.get("RANK", "0")) != 0:
        return lambda done, total: None
    start = time.monotonic()
    last = [0.0]
    label = "".join(c if c.isprintable() else "?" for c in label)  # a directory's name: no escape sequences

    def show(done: int, total: int):
        now = time.monotonic()
        if done < total and now - last[0] < 0.1:
            return
        last[0] = now
        frac = done / total if total else 1.0
        bar = "█" * int(frac * 30)
        sys.stderr.write(f"\r{label} {frac:4.0%} |{bar:<30}| {done / 1e9:.2f}/{total / 1e9:.2f} GB "
                         f"{now - start:4.0f}s")
        if done >= total:
            sys.stderr.write("\r\033[K")
        sys.stderr.flush()

    return show


def quant_name(opts: Options) -> str | None:
    """--quant, then the config file's `quant`; "none" is none."""
    name = opts.quant or opts.config.quant
    return None if name == "none" else name


def session_settings(opts: Options) -> "SessionSettings":
    """What a ChatSession needs of this run, resolved once: the flags over the config file."""
    from dschat.conversation.session import Sampling, SessionSettings

    conf = opts.config
    flags = Sampling(temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k, seed=opts.seed,
                     max_tokens=opts.max_tokens)
    file = Sampling(temperature=conf.temperature, top_p=conf.top_p, top_k=conf.top_k, max_tokens=conf.max_tokens)
    return SessionSettings(system=opts.system, default_system=conf.system, raw=opts.raw, no_save=opts.no_save,
                           continue_latest=opts.continue_latest, conversation=opts.conversation, model=opts.model,
                           sampling=flags.over(file), saved_params=opts.sampling_flags())


def sampling_params(opts: Options, engine, prompt_len: int):
    """The SamplingParams of a reply to a prompt of `prompt_len` tokens: flags, then the config file, then the
    model's generation_config.json, then built-in defaults (as a ChatSession resolves them)."""
    from dschat.conversation.context_window import ContextWindow

    sampling = session_settings(opts).sampling.resolved(engine.generation_config,
                                                        Path(engine.path) / "generation_config.json")
    window = ContextWindow(engine.context_length, engine.eos_token_ids)
    return sampling.params(window.max_tokens(prompt_len, sampling.max_tokens))


def stats_json(stats) -> str:
    """The statistics of one reply (the engine's GenerationStats, or a turn's stats dict, which a reasoning
    model's turn extends with thinking_tokens and answer_tokens) as one JSON line (`--stats`, /stats)."""
    return json.dumps(stats if isinstance(stats, dict) else stats.as_dict())


def print_stats(stats):
    print(stats_json(stats), file=sys.stderr, flush=True)
