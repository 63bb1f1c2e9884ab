"""The model's own chat template, rendered exactly as transformers renders it.

A sandboxed Jinja2 environment with trim_blocks and lstrip_blocks, the loopcontrols extension, a `tojson`
that does not escape HTML, and the globals `raise_exception`, `strftime_now`, `dict` and `namespace`; the
template sees `messages`, `add_generation_prompt`, `bos_token`, `eos_token` and any extra variables.
Rendering is bounded in size and time (template_bounds.py); an empty prompt is an error.

Tokenizing: the rendered text already holds BOS and the role tokens, so it is tokenized without adding
special tokens again (no double BOS). Control tokens that appear inside message text ("<｜User｜>" pasted into
a question, "<｜fim▁hole｜>" in pasted code) are encoded as plain text, so only the template itself writes
role, end and FIM tokens: transformers' apply_chat_template(..., sanitize_control_tokens=True) does this for
special tokens and the ones its template spells; we do it for every added token, and for messages without
such tokens the ids are exactly transformers' default ones.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext

from dschat.conversation.template_bounds import BoundedEnvironment, TemplateLimit, render_bounded

START, END = "\ue000", "\ue001"  # private-use marks around control tokens found in message text


class TemplateError(Exception):
    pass


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore names, so a template can't reach interpreter internals."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"templates may not set underscore attributes ({name!r})")


@lru_cache(maxsize=16)
def _compile(template: str):
    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=dict,
                       namespace=_Namespace)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TemplateError(f"the model's chat template does not parse (line {e.lineno}: {e.message})") from None


def render(chat_template: str, messages: list[dict], *, add_generation_prompt: bool = True,
           bos_token: str | None = None, eos_token: str | None = None, **extra) -> str:
    """The prompt text, as transformers' apply_chat_template(..., tokenize=False) gives it."""
    try:
        return render_bounded(_compile(chat_template), messages=messages, add_generation_prompt=add_generation_prompt,
                              bos_token=bos_token, eos_token=eos_token, **extra)
    except TemplateError:
        raise
    except TemplateLimit as e:
        raise TemplateError(f"the model's chat template was stopped: {e}") from None
    except jinja2.exceptions.TemplateError as e:
        raise TemplateError(f"the model's chat template refused this conversation: {e}") from None
    except (TypeError, KeyError, AttributeError, ValueError) as e:
        raise TemplateError(f"the model's chat template failed on this conversation ({e})") from None


# -- control tokens in message text ----------------------------------------------------------------------------
@lru_cache(maxsize=16)
def _patterns(tokens: tuple[str, ...]):
    longest = sorted((t for t in tokens if t), key=len, reverse=True)
    control = re.compile("|".join(map(re.escape, longest)) or "(?!)")
    marked = re.compile(f"{START}({control.pattern}){END}|[{START}{END}]")
    return control, marked


def _mark(obj, control: re.Pattern):
    if isinstance(obj, str):
        obj = obj.replace(START, "").replace(END, "")
        return control.sub(lambda m: f"{START}{m.group(0)}{END}", obj)
    if isinstance(obj, dict):
        return {k: _mark(v, control) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_mark(v, control) for v in obj]
    return obj


def control_tokens(tok) -> tuple[str, ...]:
    """The tokens only a template may write: every special token, and every other added token that is more
    than a lone character and not white space (role, FIM and tool tokens), so that no text typed into a
    message ("<｜fim▁hole｜>", "<｜User｜>") ever becomes one."""
    return tuple(t for t, special in tok.added_tokens.items() if special or (len(t) > 1 and not t.isspace()))


def render_marked(tok, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The rendered prompt with control tokens inside message text marked (see `encode_marked`)."""
    control, _ = _patterns(control_tokens(tok))
    text = render(tok.chat_template, _mark(messages, control), add_generation_prompt=add_generation_prompt,
                  bos_token=tok.bos_token, eos_token=tok.eos_token)
    if add_generation_prompt and not unmark(text).strip():
        raise TemplateError("the model's chat template rendered an empty prompt for this conversation")
    return text


def unmark(text: str) -> str:
    return text.replace(START, "").replace(END, "")


def encode_marked(tok, text: str) -> list[int]:
    """Token ids of rendered text: marked control tokens as plain text, the rest (the template's own role
    and end tokens included) normally. A lone mark still separates the text on its two sides."""
    _, marked = _patterns(control_tokens(tok))
    pieces = marked.split(text)  # [text, marked token or None, text, ...]
    ids = tok.encode(pieces[0])
    for i, piece in enumerate(pieces[1:], start=1):
        if piece:
            ids += tok.encode_plain(piece) if i % 2 else tok.encode(piece)
    return ids


# -- prompts ------------------------------------------------------------------------------------------------------------
def chat_prompt(tok, messages: list[dict], add_generation_prompt: bool = True) -> tuple[str, list[int]]:
    """(text, ids) of the model's own template applied to messages."""
    if tok.chat_template is None:
        raise TemplateError("this model has no chat template (a base model?): use --raw for text completion")
    marked = render_marked(tok, messages, add_generation_prompt)
    return unmark(marked), encode_marked(tok, marked)


def bos(tok) -> list[int]:
    """[BOS] when the tokenizer config asks for it (a prompt that no template writes starts with it), else []."""
    return [tok.bos_token_id] if tok.add_bos_token and tok.bos_token_id is not None else []


def completion_prompt(tok, text: str) -> tuple[str, list[int]]:
    """Plain text completion: BOS when the tokenizer config asks for it, then the text (as text: special
    token strings in it stay characters)."""
    first = bos(tok)
    return ((tok.bos_token or "") if first else "") + text, first + tok.encode_plain(text)
