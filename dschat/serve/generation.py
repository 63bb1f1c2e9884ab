"""From a request to prompt ids, and from prompt ids to text, on the engine.

Prompts are built with the app's own pieces: the model's chat template (template.chat_prompt: control tokens
typed in a message stay text), plain completion text, and fill-in-the-middle (fim.trim and fim.fim_prompt, as
`dschat fim` builds them). `run` is what the worker thread does for one request: it streams the engine's
tokens, decodes them (never a broken UTF-8 character), holds back text a stop string or the FIM repeat cut
could still remove, and stops at once when the request is cancelled.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from dschat.engine import SamplingParams

from dschat.fim.core import FIM_TOKENS, cut_repeat, fim_prompt, trim
from dschat.conversation.template import bos, chat_prompt

# How llama.cpp's server separates input_extra chunks for a vocabulary without a file-separator token (DeepSeek's
# has none): the chunks go before the file's text in the FIM prefix.
CHUNK_SEPARATOR = "\n\n--- snippet ---\n\n"


class PromptError(Exception):
    """The request cannot be turned into a prompt for this model (answered as a 400)."""


@dataclass
class GenSpec:
    ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings (cut before them)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    chat: bool = False  # an answer: its leading white space is the template's, dropped (as the chat does)
    fim_suffix: str | None = None  # FIM: cut where the insertion starts repeating this suffix
    at_line_start: bool = False
    reuse_cache: bool = True
    time_limit_s: float | None = None  # stop after this much decoding, once a line is complete
    warm_up: bool = False  # prefill only (n_predict 0): nothing is generated

    def view(self, raw: str) -> str:
        return raw.lstrip() if self.chat else raw

    def cut(self, text: str) -> tuple[str, str | None, bool] | None:
        """(the text cut, the stop string found, whether the FIM repeat cut it), or None when nothing cuts."""
        word, at = None, len(text)
        for s in self.stop:
            i = text.find(s)
            if s and 0 <= i < at:
                word, at = s, i
        text = text[:at]
        if self.fim_suffix is not None:
            cut, repeated = cut_repeat(text, self.fim_suffix, self.at_line_start)
            if repeated:
                return cut, None, True
        return (text, word, False) if word is not None else None

    def safe(self, text: str) -> int:
        """How much of text no later token can cut."""
        n = len(text)
        if self.stop:
            n -= max(len(s) for s in self.stop) - 1
        if self.fim_suffix is not None:
            n = min(n, text.rfind("\n") + 1)
        return max(n, 0)


@dataclass
class Outcome:
    text: str
    token_ids: list[int]
    finish: str  # "stop", "length" or "cancelled"
    stop_word: str | None
    prompt_tokens: int
    cached_tokens: int
    stats: dict = field(default_factory=dict)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class StopWhen:
    """Engine.generate's `stop` for a job: set once `cancelled()` says so (its client went away), so that a long
    prefill stops between its chunks rather than at its end. `cancelled` may be given after the generation is
    made (native.py makes it before the job)."""

    def __init__(self, cancelled=None):
        self.cancelled = cancelled

    def is_set(self) -> bool:
        return bool(self.cancelled is not None and self.cancelled())


def run(engine, spec: GenSpec, emit, cancelled) -> Outcome:
    """In the worker thread: generate, emitting ("piece", text) as it becomes final."""
    tok = engine.tokenizer
    params = SamplingParams(temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k,
                            max_tokens=max(1, spec.max_tokens), seed=spec.seed,
                            stop_token_ids=spec.stop_token_ids, ignore_eos=spec.ignore_eos)
    stops = set(spec.stop_token_ids) | (set() if spec.ignore_eos else set(engine.eos_token_ids))
    decoder = tok.stream(skip_special_tokens=True)
    raw, out, emitted = "", [], 0
    finish, final, word = None, None, None
    t_first = None
    gen = engine.generate(spec.ids, params, reuse_cache=spec.reuse_cache, stop=StopWhen(cancelled))
    try:
        for t in gen:
            if spec.warm_up:
                finish, final = "length", ""
                break
            if cancelled():
                finish = "cancelled"
                break
            out.append(t)
            t_first = t_first or time.perf_counter()
            if t in stops:
                finish = "stop"
                break
            raw += decoder.push(t)
            text = spec.view(raw)
            cut = spec.cut(text)
            if cut is not None:
                final, word, _ = cut
                finish = "stop"
                break
            if spec.time_limit_s is not None and "\n" in text and time.perf_counter() - t_first > spec.time_limit_s:
                finish, final = "length", text
                break
            safe = spec.safe(text)
            if safe > emitted:
                emit("piece", text[emitted:safe])
                emitted = safe
    finally:
        gen.close()  # a cancelled generation stops here; what it cached stays cached
    if finish is None and not gen.done and cancelled():  # stopped in its prefill (StopWhen)
        finish = "cancelled"
    if final is None:
        raw += decoder.flush()
        text = spec.view(raw)
        cut = spec.cut(text)
        final, word = (cut[0], cut[1]) if cut is not None else (text, None)
        if cut is not None:
            finish = "stop"
    finish = finish or "length"
    if len(final) > emitted:
        emit("piece", final[emitted:])
    stats = gen.stats  # this generation's own
    return Outcome(final, out, finish, word, stats.prompt_tokens, stats.cached_tokens, stats.as_dict())


# -- prompts ------------------------------------------------------------------------------------------------------
def message_text(content) -> str:
    """A message's content: a string, or OpenAI's list of parts (the text parts joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text or "" for part in content if part.type == "text")


def chat_text_ids(tok, messages: list[dict]) -> tuple[str, list[int]]:
    from dschat.conversation.template import TemplateError

    try:
        return chat_prompt(tok, messages)
    except TemplateError as e:
        raise PromptError(str(e)) from None


def chat_ids(tok, messages: list[dict]) -> list[int]:
    return chat_text_ids(tok, messages)[1]


def text_ids(tok, prompt, parse_special: bool = True) -> list[int]:
    """Plain completion: BOS where the tokenizer adds it, then the prompt. Special token text in the prompt
    ("<｜fim▁begin｜>") is read as those tokens when parse_special (the raw completion endpoints), as text
    otherwise. A list of ints is taken as token ids."""
    if isinstance(prompt, list):
        ids = [int(i) for i in prompt]
        bad = [i for i in ids if not 0 <= i < len(tok)]
        if bad:
            raise PromptError(f"token id {bad[0]} is outside the vocabulary (size {len(tok)})")
        return ids
    ids = tok.encode(prompt) if parse_special else tok.encode_plain(prompt)
    first = bos(tok)
    return ids if first and ids[:1] == first else first + ids


def fim_spec_ids(tok, prefix: str, suffix: str, budget: int, extra: list[tuple[str, str]] = (),
                 middle: str = "") -> tuple[list[int], str]:
    """The FIM prompt `dschat fim` builds for a hole between prefix and suffix (trimmed to `budget` tokens at
    the lines nearest the hole), input_extra chunks (filename, text) before the prefix; and the suffix kept.
    `middle` (llama.cpp's /infill `prompt`: the cursor line's start) goes after <｜fim▁end｜>, where the model's
    middle begins, as llama.cpp lays it out: typing on one line then changes only the prompt's last tokens."""
    if tok.fim is None:
        raise PromptError(f"this model's tokenizer has no FIM tokens ({FIM_TOKENS[0]}): use DeepSeek-Coder-V2, "
                          "V2.5 or V3 (DeepSeek-V2 was not trained for fill-in-the-middle)")
    context = "".join(CHUNK_SEPARATOR + text for _, text in extra)
    tail = tok.encode_plain(middle) if middle else []
    prefix, suffix = trim(context + prefix, suffix, lambda s: len(tok.encode_plain(s)), max(1, budget - len(tail)))
    return fim_prompt(tok, prefix, suffix) + tail, suffix


def fim_spec(tok, ids: list[int], suffix: str, max_tokens: int, before_hole: str) -> GenSpec:
    """A FIM request's generation, cut as `dschat fim` cuts it: at the FIM tokens and where it starts repeating
    the suffix (a whole line only when the hole is at a line's start: `before_hole` is the text before it)."""
    return GenSpec(ids=ids, max_tokens=max_tokens, fim_suffix=suffix,
                   at_line_start=not before_hole or before_hole.endswith("\n"), stop_token_ids=fim_stops(tok))


def fim_stops(tok) -> tuple[int, ...]:
    return tuple(i for i in (tok.token_id(t) for t in FIM_TOKENS) if i is not None)
