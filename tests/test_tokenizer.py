"""Real DeepSeek tokenizers: prompts equal transformers' apply_chat_template, streaming decode is exact."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dschat.dev import tiny_checkpoints as tc
from dschat.conversation.template import TemplateError, chat_prompt, completion_prompt, render
from dschat.engine import ModelError
from dschat.engine.tokenizer import FIM_TOKENS, Tokenizer

FAMILIES = ["deepseek-v2", "deepseek-v2.5", "deepseek-v3", "deepseek-r1"]

CONVERSATION = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "Explain MLA in one line.\nKeep it short."},
    {"role": "assistant", "content": "MLA caches a compressed latent instead of full keys and values."},
    {"role": "user", "content": "为什么这样更快？ 🚀"},
    {"role": "assistant", "content": "Less memory to read per token: 576 values per layer."},
    {"role": "user", "content": "And the <｜User｜> token, what is it? Also <｜end▁of▁sentence｜>."},
]


@pytest.fixture(scope="session")
def tokenizer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    out = {}
    for name in FAMILIES + ["deepseek-coder-33b-base"]:
        d = root / name
        d.mkdir()
        tc.install_tokenizer(d, name)
        out[name] = d
    return out


@pytest.fixture(scope="session")
def toks(tokenizer_dirs):
    return {name: Tokenizer.from_dir(d) for name, d in tokenizer_dirs.items()}


@pytest.fixture(scope="session")
def references(tokenizer_dirs):
    import transformers

    transformers.logging.set_verbosity_error()
    return {name: transformers.AutoTokenizer.from_pretrained(d) for name, d in tokenizer_dirs.items()}


def hf_ids(ref, messages, **kw):
    out = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kw)
    return list(out["input_ids"] if not isinstance(out, list) else out)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("with_system", [True, False])
def test_chat_prompt_equals_transformers(family, with_system, toks, references):
    messages = CONVERSATION if with_system else CONVERSATION[1:]
    text, ids = chat_prompt(toks[family], messages)
    ref = references[family]
    assert text == ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # the last message holds control tokens: they are encoded as text (transformers' sanitize_control_tokens)
    assert ids == hf_ids(ref, messages, sanitize_control_tokens=True)
    # and without such text, the ids are transformers' default ones
    assert chat_prompt(toks[family], messages[:-1])[1] == hf_ids(ref, messages[:-1])
    bos = toks[family].bos_token_id
    assert ids[0] == bos and ids.count(bos) == 1  # no double BOS


@pytest.mark.parametrize("family", FAMILIES)
def test_first_turn_equals_transformers(family, toks, references):
    messages = [{"role": "user", "content": "hello"}]
    assert chat_prompt(toks[family], messages)[1] == hf_ids(references[family], messages)


def test_control_tokens_in_message_text_stay_text(toks):
    tok = toks["deepseek-v3"]
    _, ids = chat_prompt(tok, [{"role": "user", "content": "what does <｜Assistant｜> mean?"}])
    assistant = tok.token_id("<｜Assistant｜>")
    assert ids.count(assistant) == 1 and ids[-1] == assistant  # only the template's own one


PASTED = "code with <｜fim▁hole｜>, <｜fim▁begin｜>, <｜fim▁end｜>, <｜tool▁sep｜> and <｜end▁of▁sentence｜> in it"


@pytest.mark.parametrize("family", ["deepseek-v3", "deepseek-v2.5", "deepseek-r1"])
def test_fim_and_other_added_tokens_in_a_message_stay_text(family, toks):
    tok = toks[family]
    text, ids = chat_prompt(tok, [{"role": "user", "content": PASTED}])
    assert PASTED in text and tok.decode(ids) == text
    added = {tok.token_id(t) for t in tok.added_tokens}
    # only the template's own tokens (BOS, the role tokens, R1's <think>), as for a message without any
    _, plain = chat_prompt(tok, [{"role": "user", "content": "x"}])
    assert [i for i in ids if i in added] == [i for i in plain if i in added]
    assert tok.token_id("<｜Assistant｜>") in ids


def test_show_prompt_of_a_pasted_fim_token(chat_models):
    from test_pipe_mode import run

    r = run(["--model", str(chat_models["v3"]), "--show-prompt"], stdin=PASTED)
    tok = Tokenizer.from_dir(chat_models["v3"])
    ids = json.loads(r.stdout)["ids"]
    assert r.returncode == 0 and not {tok.token_id(t) for t in FIM_TOKENS + ("<｜end▁of▁sentence｜>",)} & set(ids)


def test_raw_completion_encodes_special_token_strings_as_text(toks):
    tok = toks["deepseek-v3"]
    _, ids = completion_prompt(tok, PASTED)
    assert ids == [tok.bos_token_id] + tok.encode_plain(PASTED)
    assert not set(ids[1:]) & {tok.token_id(t) for t in tok.added_tokens}


def test_v2_template_has_no_space_after_assistant(toks):
    text, _ = chat_prompt(toks["deepseek-v2"], [{"role": "user", "content": "hi"}])
    assert text.endswith("Assistant:")


def test_special_tokens_and_fim(toks):
    v2, v3 = toks["deepseek-v2"], toks["deepseek-v3"]
    assert v2.bos_token == v3.bos_token == "<｜begin▁of▁sentence｜>"
    assert v3.eos_token_id == 1 and v2.eos_token_id == 100001
    assert v2.fim is None  # DeepSeek-V2's tokenizer has no FIM tokens
    assert toks["deepseek-v2.5"].fim is not None and v3.fim is not None
    assert v3.eos_token_id in v3.special_ids and v3.add_bos_token
    assert v3.encode("<｜fim▁begin｜>x") == [v3.fim[0]] + v3.encode("x")


def test_base_model_has_no_template(toks):
    tok = toks["deepseek-coder-33b-base"]
    assert tok.chat_template is None
    with pytest.raises(TemplateError, match="no chat template"):
        chat_prompt(tok, [{"role": "user", "content": "x"}])
    text, ids = completion_prompt(tok, "def f():")
    assert ids == [tok.bos_token_id] + tok.encode("def f():")


def test_encode_decode_round_trip(toks):
    tok = toks["deepseek-v3"]
    s = "def f(x):\n\treturn x ** 2  # 平方 ✓ 😀\n"
    assert tok.decode(tok.encode(s)) == s
    assert tok.encode(s) == tok.tk.encode(s, add_special_tokens=False).ids


# -- streaming --------------------------------------------------------------------------------------------------------
MIXED = ("Hello, world! 你好，世界。Emoji: 😀🚀👩‍👩‍👧‍👦 and ünïcödé, then code:\n```python\nprint('é')\n```\n"
         "日本語のテキストも。한국어도. Ελληνικά. 🇫🇷🏳️‍🌈")


def stream_all(tok, ids, skip):
    d = tok.stream(skip_special_tokens=skip)
    pieces = [d.push(i) for i in ids]
    pieces.append(d.flush())
    for p in pieces:
        assert "\ufffd" not in p or "\ufffd" in tok.decode(ids, skip_special_tokens=skip)
    return "".join(pieces)


@pytest.mark.parametrize("family", ["deepseek-v2", "deepseek-v3"])
@pytest.mark.parametrize("skip", [True, False])
def test_streaming_decode_equals_one_shot(family, skip, toks):
    tok = toks[family]
    ids = tok.encode(MIXED) + [tok.eos_token_id] + tok.encode("après 🎉")
    assert stream_all(tok, ids, skip) == tok.decode(ids, skip_special_tokens=skip)


def test_streaming_never_splits_a_character(toks):
    tok = toks["deepseek-v3"]
    ids = tok.encode("🚀🚀🚀 漢字")
    d = tok.stream()
    for i in ids:
        piece = d.push(i)
        assert "\ufffd" not in piece
        piece.encode("utf-8")  # whole characters only


def test_streaming_random_token_soup(toks):
    """Arbitrary ids (byte fragments that never form valid UTF-8) still stream to the one-shot decode."""
    tok = toks["deepseek-v3"]
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(0, 128000) for _ in range(40)]
        assert stream_all(tok, ids, True) == tok.decode(ids, skip_special_tokens=True)


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80))
def test_streaming_property(toks, text):
    tok = toks["deepseek-v3"]
    ids = tok.encode(text)
    assert stream_all(tok, ids, False) == tok.decode(ids)


# -- errors -----------------------------------------------------------------------------------------------------------
def test_missing_and_corrupt_tokenizer(tmp_path, tokenizer_dirs):
    with pytest.raises(ModelError, match="tokenizer.json is missing"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ModelError, match="not a readable tokenizer"):
        Tokenizer.from_dir(tmp_path)


def test_template_errors():
    with pytest.raises(TemplateError, match="roles must alternate"):
        render("{{ raise_exception('roles must alternate') }}", [])
    with pytest.raises(TemplateError, match="does not parse"):
        render("{% if %}", [])
    # the sandbox: no reaching into Python internals
    with pytest.raises(TemplateError):
        render("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}", [])


def test_transformers_environment_features():
    t = ("{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{{ m | tojson }}\n{% endfor %}"
         "{% set ns = namespace(n=0) %}{% set ns.n = 5 %}{{ ns.n }}")
    out = render(t, [{"a": "<b>é"}, {"a": 2}, {"a": 3}])
    assert out == '{"a": "<b>é"}\n{"a": 2}\n5'  # tojson does not escape HTML
