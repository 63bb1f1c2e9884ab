"""A checkpoint's tokenizer: tokenizer.json through the `tokenizers` library, special tokens and the chat
template from tokenizer_config.json, and streaming detokenisation that never emits broken UTF-8."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ModelError
from . import files

FIM_TOKENS = ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>")


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"content": ..., ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A checkpoint's tokenizer (tokenizer.json through the `tokenizers` library, with tokenizer_config.json's
    special tokens and chat template)."""

    def __init__(self, tk, config: dict, chat_template: str | None):
        self.tk = tk
        self.config = config
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.bos_token_id = tk.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = tk.token_to_id(self.eos_token) if self.eos_token else None
        self.add_bos_token = bool(config.get("add_bos_token", self.bos_token is not None))
        self.add_eos_token = bool(config.get("add_eos_token", False))
        self.chat_template = chat_template
        added = tk.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        self.added_tokens = {t.content: t.special for t in added.values()}  # content -> special?
        ids = [tk.token_to_id(t) for t in FIM_TOKENS]
        self.fim = tuple(ids) if None not in ids else None

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        file = path / "tokenizer.json"
        if not file.exists():
            raise ModelError(f"{path}: no tokenizer here (tokenizer.json is missing)")
        try:
            tk = HFTokenizer.from_str(files.read_text(file))
        except files.UnreadableFile as e:  # a FIFO, say
            raise ModelError(str(e)) from None
        except Exception as e:  # the tokenizers library raises its own exception types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"{file}: not a readable tokenizer ({first})") from None
        config, template = {}, None
        cfg_file = path / "tokenizer_config.json"
        if cfg_file.exists():
            try:
                config = json.loads(files.read_text(cfg_file))
            except files.UnreadableFile as e:
                raise ModelError(str(e)) from None
            except OSError as e:
                raise ModelError(f"{cfg_file}: cannot read ({e})") from None
            except ValueError as e:
                raise ModelError(f"{cfg_file}: not valid JSON ({e})") from None
            template = config.get("chat_template")
            if isinstance(template, list):  # named templates: take the default one
                named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
                template = named.get("default") or next(iter(named.values()), None)
        jinja = path / "chat_template.jinja"
        if template is None and jinja.exists():
            try:
                template = files.read_text(jinja)
            except files.UnreadableFile as e:
                raise ModelError(str(e)) from None
            except (OSError, ValueError) as e:
                raise ModelError(f"{jinja}: cannot read ({e})") from None
        return cls(tk, config, template)

    def __len__(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of text; special tokens written in it are recognised, none are added (no BOS)."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of text with every added token spelled out as ordinary text (for user-supplied text
        that happens to contain "<｜User｜>" or the like): normaliser, pre-tokeniser and BPE model only."""
        tk = self.tk
        if tk.normalizer is not None:
            text = tk.normalizer.normalize_str(text)
        pieces = [p for p, _ in tk.pre_tokenizer.pre_tokenize_str(text)] if tk.pre_tokenizer else [text]
        return [t.id for p in pieces for t in tk.model.tokenize(p)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def stream(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Incremental detokenisation. Text is released only when it ends on a whole character: the decode of a
    short window (from the last clean boundary) is compared with the decode of the same window without the
    newest tokens, and a window ending in a partial UTF-8 sequence (U+FFFD) waits for more tokens.
    Everything pushed, plus flush(), equals the one-shot decode of all the ids."""

    def __init__(self, tok: Tokenizer, skip_special_tokens: bool = True):
        self.tok, self.skip = tok, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # the window starts here (a character boundary)
        self.read = 0  # text up to here has been released

    def _decode(self, a: int, b: int | None = None) -> str:
        return self.tok.decode(self.ids[a:b], skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self._decode(self.prefix, self.read)
        now = self._decode(self.prefix)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        before = self._decode(self.prefix, self.read)
        now = self._decode(self.prefix)
        self.prefix = self.read = len(self.ids)
        return now[len(before):]
