"""A conversation with a model: messages, the exact token history, and streaming replies.

Token continuity: the engine's latent cache is keyed by token ids, so turn k+1 must start with exactly
the ids of turn k — its prompt plus the tokens the model generated (end-of-turn token included), not a
re-tokenisation of the reply text, which can differ ("\\n"+"\\n" vs "\\n\\n", merges at the seam, the space
after "Assistant:"). So each turn renders the conversation with the model's template, checks that the
text the history ids stand for is a prefix of it, and tokenizes only the new text. Where a template
rewrites history (R1 drops old reasoning), the check fails and the whole prompt is tokenized afresh; the
cache still reuses the longest common prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from itertools import chain
from typing import Iterable, Iterator

from dschat.conversation.prompt_fit import cut_points
from dschat.conversation.template import START, completion_prompt, control_tokens, encode_marked, render_marked, unmark


@dataclass
class Turn:
    user: str
    marked_prompt: str  # the rendered prompt, control tokens in message text marked (see template.py)
    prompt_ids: list[int]
    continued: bool  # True when prompt_ids extend the previous turn's ids
    output_ids: list[int] = field(default_factory=list)
    reply: str = ""  # the reply as generated: the decoded text without special tokens (see Chat.stream)
    interrupted: bool = False
    stats: dict = field(default_factory=dict)
    # a reasoning model's turn (see reasoning.py): the thinking and the answer the reply holds, shown apart
    reasoning: str = ""
    answer: str = ""
    sampling: dict = field(default_factory=dict)  # how the reply was sampled: temperature, top_p, top_k (and seed)

    @property
    def prompt_text(self) -> str:
        return unmark(self.marked_prompt)

    @property
    def content(self) -> str:
        """The reply as the conversation keeps it (and the history saves it): the reply as shown."""
        return self.reply


class Chat:
    """A conversation with a model: its messages, the exact token ids of its history (`ids`, with the rendered
    text they stand for, `history_rendered`), and each turn's prompt (see the module's docstring). A Turn's `reply`
    is its reply as shown; `marked_prompt` its rendered prompt, control tokens typed in messages marked."""

    def __init__(self, tokenizer, system: str | None = None, raw: bool = False,
                 messages: list[dict] | None = None, history_ids: list[int] | None = None):
        self.tok, self.raw = tokenizer, raw
        self.messages: list[dict] = []
        if system:
            self.messages.append({"role": "system", "content": system})
        self.messages += [dict(m) for m in messages or []]
        self.ids: list[int] = list(history_ids or [])
        # the (marked) rendered text that self.ids stand for; None where unknown (history loaded from elsewhere)
        self.history_rendered: str | None = None
        self._before_last: tuple[list[int], str | None] | None = None
        self._rewound = None  # the state before the last rewind, for restore()
        self.window = None  # the model's ContextWindow, when known: a prompt must fit it

    @property
    def completing(self) -> bool:
        """Plain text completion (--raw, or a model without a chat template) rather than a chat."""
        return self.raw or self.tok.chat_template is None

    @property
    def system(self) -> str | None:
        return next((m["content"] for m in self.messages if m["role"] == "system"), None)

    def render_prompt(self, messages: list[dict]) -> tuple[str, list[int]]:
        """(marked text, ids) of the prompt for these messages."""
        if self.completing:  # --raw, or a base model: text completion
            rendered = "".join(m["content"] for m in messages if m["role"] != "system") if self.raw \
                else messages[-1]["content"]
            self._check_fits(rendered, 0, self.tok.encode_plain)
            return completion_prompt(self.tok, rendered)
        rendered = render_marked(self.tok, messages)
        if self.ids and self.history_rendered is None:
            # history ids from a saved conversation: use them if they spell the re-rendered history
            history = render_marked(self.tok, self.messages, add_generation_prompt=False)
            if self.tok.decode(self.ids) == unmark(history):
                self.history_rendered = history
            else:
                self.ids = []
        encode = partial(encode_marked, self.tok)
        cuts = cut_points(control_tokens(self.tok), START)
        if self.ids and rendered.startswith(self.history_rendered):
            self._check_fits(rendered[len(self.history_rendered):], len(self.ids), encode, cuts)
            return rendered, self.ids + encode(rendered[len(self.history_rendered):])
        self._check_fits(rendered, 0, encode, cuts)
        return rendered, encode(rendered)

    def _check_fits(self, rendered: str, used: int, encode, cuts=None):
        """A prompt that cannot fit the window fails before it is tokenized whole (context_window.py)."""
        if self.window is not None:
            self.window.check_prompt(rendered, used, encode, cuts)

    def turn(self, user: str) -> Turn:
        """The prompt for the next user message (nothing is changed until `commit`)."""
        messages = self.messages + [{"role": "user", "content": user}]
        rendered, ids = self.render_prompt(messages)
        continued = bool(self.ids) and ids[: len(self.ids)] == self.ids
        return Turn(user, rendered, ids, continued)

    def set_system(self, system: str | None):
        """Replace the system prompt (none for empty or blank); the next turn renders the whole conversation."""
        self.messages = [m for m in self.messages if m["role"] != "system"]
        if system and system.strip():
            self.messages.insert(0, {"role": "system", "content": system})
        self.ids, self.history_rendered = [], None

    def rewind(self) -> str:
        """Drop the last exchange (to regenerate it, or to edit and resend its prompt); returns its user
        message. The history ids go back to what they were before it."""
        if len(self.messages) < 2 or self.messages[-1]["role"] != "assistant":
            raise ValueError("there is no answer to take back yet")
        user = self.messages[-2]["content"]
        self._rewound = (self.messages, self.ids, self.history_rendered, self._before_last)
        self.messages = self.messages[:-2]
        self.ids, self.history_rendered = self._before_last if self._before_last else ([], None)
        self._before_last = None
        return user

    def restore(self):
        """Undo the last `rewind` (a regenerated answer that failed before its first token)."""
        if self._rewound is None:
            raise ValueError("nothing to restore")
        (self.messages, self.ids, self.history_rendered, self._before_last), self._rewound = self._rewound, None

    def regenerate_turn(self) -> Turn:
        """A new answer to the last user message (the same prompt ids, so the cache serves all of it)."""
        return self.turn(self.rewind())

    def stream(self, turn: Turn, tokens: Iterable[int]) -> Iterator[str]:
        """The reply's text as its tokens arrive, each piece complete (never a broken UTF-8 sequence).
        A completion keeps every byte (leading whitespace is indentation in code); a chat answer drops
        its leading whitespace, which the template writes itself (V2 puts a space after "Assistant:")."""
        decoder = self.tok.stream(skip_special_tokens=True)
        started = self.completing
        for token in chain(tokens, [None]):  # None: the end, flush the decoder
            if token is None:
                piece = decoder.flush()
            else:
                turn.output_ids.append(token)
                piece = decoder.push(token)
            if not started:
                piece = piece.lstrip()
                started = bool(piece)
            if piece:
                turn.reply += piece
                yield piece

    def add_exchange(self, user: str, reply: str, ids: list[int] | None = None):
        """Append an exchange that ran elsewhere (a saved one); `ids`, when known, are the exact token ids
        of the whole history after it."""
        self._before_last = (list(self.ids), self.history_rendered)
        self.messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        self.ids, self.history_rendered = list(ids or []), None

    def commit(self, turn: Turn):
        """Add the exchange to the conversation, even a partial (interrupted) one."""
        self._before_last = (list(self.ids), self.history_rendered)
        self.messages += [{"role": "user", "content": turn.user},
                          {"role": "assistant", "content": turn.content}]
        self.ids = turn.prompt_ids + turn.output_ids
        self.history_rendered = turn.marked_prompt + self.tok.decode(turn.output_ids)

    def clear(self):
        system = self.system
        self.messages = [{"role": "system", "content": system}] if system else []
        self.ids, self.history_rendered = [], None
