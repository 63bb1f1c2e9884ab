"""The demo model's tokenizer: byte-level BPE trained on the training files, DeepSeek's special tokens, a
V3-shaped chat template; wrapped in the app's own Tokenizer class so that training data is encoded exactly as
dschat encodes prompts."""

from __future__ import annotations

from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

from dschat.engine.tokenizer import Tokenizer

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
FIM_BEGIN, FIM_HOLE, FIM_END = "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"
SPECIALS = [BOS, EOS, PAD, USER, ASSISTANT, FIM_BEGIN, FIM_HOLE, FIM_END]
SYSTEM = "You are a small demo model trained on Python's standard library."
MAX_LENGTH = 8192  # model_max_length in tokenizer_config.json

# The chat template (V3's shape: BOS, system text, then <｜User｜>…<｜Assistant｜>…<｜end▁of▁sentence｜>).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if not messages or messages[0]['role'] != 'system' %}"
    + SYSTEM +
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{ message['content'] }}"
    "{%- elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)


def train_tokenizer(texts: list[str], vocab: int):
    """A `tokenizers.Tokenizer`; the special tokens get ids 0.. in SPECIALS order (BOS 0, EOS 1)."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def tokenizer_config() -> dict:
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_LENGTH,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }


def app_tokenizer(tk):
    """The app's Tokenizer (what dschat builds from tokenizer.json + tokenizer_config.json) around `tk`."""
    return Tokenizer(tk, tokenizer_config(), CHAT_TEMPLATE)


def from_json(text: str):
    return app_tokenizer(HFTokenizer.from_str(text))
