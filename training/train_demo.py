"""Train dschat's bundled demo model: a tiny DeepSeek-V3-architecture model on Python's standard library.

    python training/train_demo.py --out dschat/demo_model            # the shipped model (use a GPU)
    python training/train_demo.py --tiny --steps 20 --out /tmp/demo  # a smoke test on the CPU

What it does, all from a seed:
  1. corpus: the .py files of this interpreter's standard library (tests excluded); every 20th module, by a
     stable hash of its path, is held out for evaluation;
  2. tokenizer: byte-level BPE (tokenizers) trained on the training files, with DeepSeek's special tokens;
  3. pre-training on code: next-token loss plus V3's multi-token-prediction loss (weight 0.3), half the
     examples in fill-in-the-middle form <｜fim▁begin｜>prefix<｜fim▁hole｜>suffix<｜fim▁end｜>middle;
     aux-loss-free load balancing (the router's e_score_correction_bias follows the expert loads);
  4. chat stage: questions about modules, functions and classes answered from their signatures and
     docstrings (generated with `inspect` from the library itself), in the model's chat template, mixed
     with code so FIM is kept;
  5. writes the hub layout (config.json, safetensors shards + index, tokenizer files, generation_config.json)
     and reports held-out loss, single-line FIM exact match and the MTP acceptance rate.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import math
import os
import random
import re
import sys
import sysconfig
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dschat.engine.config import ModelConfig  # noqa: E402
from dschat.engine.model import Gate, Transformer  # noqa: E402

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
FIM_BEGIN, FIM_HOLE, FIM_END = "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"
SPECIALS = [BOS, EOS, PAD, USER, ASSISTANT, FIM_BEGIN, FIM_HOLE, FIM_END]

# The chat template (V3's shape: BOS, system text, then <｜User｜>…<｜Assistant｜>…<｜end▁of▁sentence｜>).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if not messages or messages[0]['role'] != 'system' %}"
    "You are a small demo model trained on Python's standard library."
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{ message['content'] }}"
    "{%- elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)

SYSTEM = "You are a small demo model trained on Python's standard library."  # also the template's default


def model_config(tiny: bool, vocab: int) -> dict:
    c = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": vocab,
        "hidden_size": 256,
        "intermediate_size": 1024,
        "moe_intermediate_size": 192,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 128,
        "kv_lora_rank": 64,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "n_routed_experts": 16,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "n_group": 4,
        "topk_group": 2,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "num_nextn_predict_layers": 1,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "attention_bias": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "bfloat16",
    }
    if tiny:
        c.update(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                 q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                 n_routed_experts=4, n_group=2, topk_group=1)
    return c


# -- corpus ----------------------------------------------------------------------------------------------------
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "lib2to3", "turtledemo", "idlelib", "ensurepip",
             "venv"}
TEST_DIRS = {"test", "tests", "idle_test"}


def is_test(rel: str) -> bool:
    parts = Path(rel).parts
    return bool(set(parts[:-1]) & TEST_DIRS) or parts[-1].startswith("test_")


def stdlib_files(limit: int | None = None, tests: bool = True) -> list[tuple[str, str]]:
    """(relative path, text) of the standard library's .py files; its own test suite too when `tests`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if set(rel.parts[:-1]) & SKIP_DIRS or (not tests and is_test(str(rel))):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        out.append((str(rel), text))
    return out[:limit] if limit else out


def held_out(rel: str) -> bool:
    return int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 20 == 0


# -- tokenizer ---------------------------------------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
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
        "model_max_length": 4096,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }


# -- chat data from the library itself -----------------------------------------------------------------------------
CHAT_MODULES = """os os.path sys json re collections itertools functools pathlib subprocess shutil math random
datetime time typing dataclasses string textwrap urllib.parse urllib.request http.client csv sqlite3 hashlib
base64 logging argparse unittest io struct heapq bisect copy glob fnmatch tempfile zipfile tarfile gzip bz2
lzma pickle enum abc contextlib threading queue asyncio socket select signal statistics fractions decimal
operator inspect traceback warnings weakref uuid secrets platform locale calendar pprint difflib shlex
configparser xml.etree.ElementTree html html.parser email json.decoder array codecs unicodedata zlib hmac
getpass optparse sched shelve dbm timeit cProfile pstats dis ast tokenize keyword types numbers cmath
ipaddress mimetypes binascii quopri smtplib ftplib imaplib poplib socketserver http.server wsgiref
concurrent.futures multiprocessing filecmp fileinput stat linecache graphlib zoneinfo""".split()


def summary(doc: str | None) -> str | None:
    if not doc:
        return None
    para = doc.strip().split("\n\n")[0]
    para = " ".join(para.split())
    if len(para) < 12 or len(para) > 600:
        return None
    return para


def chat_pairs() -> list[tuple[str, str]]:
    """(question, answer) pairs about the standard library, from signatures and docstrings."""
    pairs = []
    warnings.simplefilter("ignore")
    for modname in CHAT_MODULES:
        try:
            mod = importlib.import_module(modname)
        except Exception:
            continue
        s = summary(mod.__doc__)
        if s:
            pairs.append((f"What is the {modname} module for?", f"The `{modname}` module: {s}"))
            pairs.append((f"Tell me about {modname}.", f"`{modname}` is a standard library module. {s}"))
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
                continue
            s = summary(inspect.getdoc(obj))
            if not s:
                continue
            qual = f"{modname}.{name}"
            try:
                sig = str(inspect.signature(obj))
            except (TypeError, ValueError):
                sig = "(...)"
            kind = "class" if inspect.isclass(obj) else "function"
            pairs.append((f"What does {qual} do?", f"`{qual}{sig}` {s}"))
            pairs.append((f"How do I use {qual}?", f"Call `{qual}{sig}`. {s}"))
            pairs.append((f"Which module has {name}?", f"`{name}` is a {kind} in the `{modname}` module. {s}"))
    return pairs


# -- batches -----------------------------------------------------------------------------------------------------------
class Data:
    def __init__(self, tok, files: list[tuple[str, str]], pairs, seq: int, seed: int):
        self.tok, self.seq = tok, seq
        self.rng = random.Random(seed)
        self.ids = {s: tok.token_to_id(s) for s in SPECIALS}
        self.texts = [t for _, t in files if len(t) > 200]
        docs = tok.encode_batch([t for _, t in files])
        self.stream = []
        for d in docs:
            self.stream += [self.ids[BOS]] + d.ids + [self.ids[EOS]]
        self.chats = []
        for q, a in pairs:
            prompt = tok.encode(f"{BOS}{SYSTEM}{USER}{q}{ASSISTANT}").ids
            answer = tok.encode(f"{a}{EOS}").ids
            self.chats.append((prompt, answer))

    def hole(self, text: str) -> tuple[int, int]:
        """Where the middle is cut out, in characters (as `dschat fim` cuts it at inference): the rest of a
        line from the cursor, one to a few whole lines, or a random span."""
        rng = self.rng
        kind = rng.random()
        starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n"]
        if kind < 0.4:  # the rest of a line, from after its indentation or from inside it
            k = rng.randrange(len(starts) - 1)
            line = text[starts[k]:starts[k + 1] - 1]
            indent = len(line) - len(line.lstrip())
            a = starts[k] + (indent if rng.random() < 0.6 else rng.randint(indent, len(line)))
            return a, starts[k + 1] - 1
        if kind < 0.75:  # whole lines, newline included
            k = rng.randrange(len(starts) - 1)
            j = min(len(starts) - 1, k + rng.choice((1, 1, 2, 3, 5)))
            return starts[k], starts[j]
        a = rng.randrange(len(text))
        return a, min(len(text), a + rng.randint(1, 200))

    def code(self) -> tuple[list[int], list[int]]:
        S = self.seq
        if self.rng.random() < 0.5:  # fill-in-the-middle, cut in characters and tokenized piece by piece
            text = self.rng.choice(self.texts)
            start = self.rng.randrange(0, max(1, len(text) - 4 * S))
            text = text[start:start + 4 * S]
            a, b = self.hole(text)
            pre, mid, suf = (e.ids for e in self.tok.encode_batch([text[:a], text[a:b], text[b:]]))
            room = S - 4 - len(mid)  # keep the middle whole; trim the far ends of prefix and suffix
            if room < 16:
                return self.code()
            keep_suf = min(len(suf), room // 4)
            keep_pre = min(len(pre), room - keep_suf)
            pre, suf = pre[len(pre) - keep_pre:], suf[:keep_suf + (room - keep_suf - keep_pre)]
            seq = [self.ids[FIM_BEGIN]] + pre + [self.ids[FIM_HOLE]] + suf + [self.ids[FIM_END]] + mid + \
                [self.ids[EOS]]
            labels = [-100] * (len(pre) + len(suf) + 3) + mid + [self.ids[EOS]]
            return seq, labels
        start = self.rng.randrange(0, max(1, len(self.stream) - S - 1))
        window = self.stream[start:start + S + 1]
        return window, window

    def chat(self) -> tuple[list[int], list[int]]:
        seq, labels = [], []
        while len(seq) < self.seq:  # pack several exchanges
            p, a = self.rng.choice(self.chats)
            seq += p + a
            labels += [-100] * len(p) + a
        return seq, labels

    def batch(self, n: int, chat_share: float, device) -> tuple[torch.Tensor, torch.Tensor]:
        S = self.seq
        xs, ys = [], []
        for _ in range(n):
            seq, labels = self.chat() if self.chats and self.rng.random() < chat_share else self.code()
            seq, labels = seq[: S + 1], labels[: S + 1]
            pad = S + 1 - len(seq)
            xs.append(seq + [self.ids[PAD]] * pad)
            ys.append(labels + [-100] * pad)
        x = torch.tensor(xs, device=device)
        y = torch.tensor(ys, device=device)
        return x[:, :-1], y[:, 1:]  # inputs, next-token targets


# -- model -------------------------------------------------------------------------------------------------------------
def build_model(cfg: ModelConfig, device, seed: int) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).to(device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight", "experts.w2")):
                p.normal_(0, 0.02 / math.sqrt(2 * (cfg.num_hidden_layers + 1)))
            else:
                p.normal_(0, 0.02)
        for m in model.modules():
            if isinstance(m, Gate) and m.e_score_correction_bias is not None:
                m.e_score_correction_bias.zero_()
        # The MTP module shares the embedding and output head with the main model (as in the V3 report).
        for m in model.mtp:
            m.embed_tokens.weight = model.model.embed_tokens.weight
            m.shared_head.head.weight = model.lm_head.weight
    return model


def losses(model: Transformer, x: torch.Tensor, y: torch.Tensor):
    """Next-token loss and the MTP loss (the module predicts t_{i+2} from h_i and t_{i+1})."""
    S = x.shape[1]
    pos = torch.arange(S, device=x.device)
    h = model(x, pos)
    main = F.cross_entropy(model.head(h).flatten(0, 1), y.flatten(), ignore_index=-100)
    if not len(model.mtp):
        return main, torch.zeros((), device=x.device)
    # depth 1: inputs at positions 0..S-2 are (norm(h_i), t_{i+1} = x[:, i+1]); targets t_{i+2} = y[:, i+1]
    _, mtp_logits = model.mtp_forward(0, model.model.norm(h[:, :-1]), x[:, 1:], pos[:-1])
    mtp = F.cross_entropy(mtp_logits.flatten(0, 1), y[:, 1:].flatten(), ignore_index=-100)
    return main, mtp


class LoadBalancer:
    """Aux-loss-free balancing (V3 report): after each step, nudge each router's bias up for underloaded
    experts and down for overloaded ones."""

    def __init__(self, model: Transformer, rate: float):
        self.rate = rate
        self.counts: dict[Gate, torch.Tensor] = {}
        for m in model.modules():
            if isinstance(m, Gate) and m.e_score_correction_bias is not None:
                m.register_forward_hook(self._record)

    def _record(self, gate, inputs, output):
        _, idx = output
        c = torch.bincount(idx.flatten(), minlength=gate.cfg.n_routed_experts).float()
        self.counts[gate] = self.counts.get(gate, 0) + c

    @torch.no_grad()
    def step(self):
        for gate, c in self.counts.items():
            gate.e_score_correction_bias += self.rate * torch.sign(c.mean() - c)
        self.counts.clear()


# -- saving ---------------------------------------------------------------------------------------------------------------
def save(model: Transformer, tok, cfg_dict: dict, out: Path, max_shard_bytes: int = 14 * 2**20):
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, p in model.hub_tensors().items():
        mtp = name.startswith("model.layers.")
        if mtp and name.endswith(("shared_head.head.weight", "embed_tokens.weight")):
            continue  # the MTP module shares them with the main model: the loader links them
        keep_fp32 = name.endswith("e_score_correction_bias")
        tensors[name] = p.detach().to("cpu", torch.float32 if keep_fp32 else torch.bfloat16).contiguous()
    shards, cur, size = [], {}, 0
    for name in sorted(tensors):
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = t
        size += nbytes
    shards.append(cur)
    weight_map = {}
    for k, part in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(part, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg_dict, indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg_dict["bos_token_id"], "eos_token_id": cfg_dict["eos_token_id"], "do_sample": True,
         "temperature": 0.3, "top_p": 0.95, "max_new_tokens": 256}, indent=2) + "\n")


# -- evaluation -------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def heldout_loss(model, data: Data, files, device, n_windows: int = 64) -> float:
    stream = []
    for d in data.tok.encode_batch([t for _, t in files]):
        stream += d.ids
    S, total, count = data.seq, 0.0, 0
    for k in range(n_windows):
        start = (k * 7919 * S) % max(1, len(stream) - S - 1)
        w = torch.tensor([stream[start:start + S + 1]], device=device)
        if w.shape[1] < S + 1:
            continue
        logits = model.head(model(w[:, :-1], torch.arange(S, device=device)))
        total += float(F.cross_entropy(logits[0], w[0, 1:]))
        count += 1
    return total / max(1, count)


def evaluate(model_dir: Path, tok, files, n: int, device: str, seed: int) -> dict:
    """Through the production path (Engine.from_pretrained on the written files): single-line FIM exact
    match on held-out files, and the MTP acceptance rate of greedy decoding on held-out code prompts."""
    from dschat.engine import Engine, SamplingParams

    rng = random.Random(seed)
    eng = Engine.from_pretrained(model_dir, device=device, speculative="mtp", draft_tokens=1)
    bos = tok.token_to_id(BOS)
    stop = tuple(tok.token_to_id(t) for t in (FIM_BEGIN, FIM_HOLE, FIM_END))
    hits = tried = 0
    drafts = accepted = 0
    for _ in range(n):
        rel, text = rng.choice(files)
        lines = text.split("\n")
        cands = [i for i, ln in enumerate(lines) if len(ln.strip()) >= 8 and i > 3]
        if not cands:
            continue
        i = rng.choice(cands)  # the hole: line i after its indentation (a cursor at the start of the code)
        indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
        prefix = "\n".join(lines[:i]) + "\n" + indent
        suffix = "\n" + "\n".join(lines[i + 1:])
        prefix, suffix = prefix[-3000:], suffix[:1000]
        ids = [bos] + tok.encode(f"{FIM_BEGIN}{prefix}{FIM_HOLE}{suffix}{FIM_END}").ids
        out = list(eng.generate(ids, SamplingParams(max_tokens=48, stop_token_ids=stop)))
        text_out = tok.decode(out, skip_special_tokens=True)
        tried += 1
        hits += text_out.split("\n")[0].strip() == lines[i].strip()
        # MTP acceptance on a plain code continuation
        start = rng.randrange(0, max(1, len(text) - 1500))
        ids = [bos] + tok.encode(text[start:start + 1500]).ids[-400:]
        list(eng.generate(ids, SamplingParams(max_tokens=48, ignore_eos=True)))
        drafts += eng.stats["draft_tokens"]
        accepted += eng.stats["accepted_tokens"]
    return {"fim_exact_match": hits / max(1, tried), "fim_holes": tried,
            "mtp_acceptance": accepted / max(1, drafts), "mtp_drafts": drafts}


# -- main ---------------------------------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3000, help="pre-training steps")
    ap.add_argument("--chat-steps", type=int, default=800, help="chat-stage steps")
    ap.add_argument("--minutes", type=float, default=None, help="stop pre-training after this long")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--tiny", action="store_true", help="a tiny model and corpus, for tests")
    ap.add_argument("--eval", type=int, default=200, help="held-out FIM holes / MTP prompts to evaluate")
    ap.add_argument("--evaluate", type=Path, metavar="DIR",
                    help="only evaluate an existing model directory on the held-out modules")
    args = ap.parse_args()
    if args.evaluate:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(args.evaluate / "tokenizer.json"))
        test_files = [f for f in stdlib_files(tests=False) if held_out(f[0])]
        print(json.dumps(evaluate(args.evaluate, tok, test_files, args.eval, args.device, args.seed)))
        return

    t_start = time.time()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    files = stdlib_files(limit=40 if args.tiny else None)
    train_files = [f for f in files if not held_out(f[0])]
    test_files = [f for f in files if held_out(f[0]) and not is_test(f[0])] or files[:2]
    print(f"corpus: {len(train_files)} training files, {len(test_files)} held out "
          f"({sum(len(t) for _, t in files) / 1e6:.1f} MB, Python {sys.version.split()[0]})", flush=True)
    tok = train_tokenizer([t for _, t in train_files], 512 if args.tiny else args.vocab)
    vocab = tok.get_vocab_size()
    assert [tok.token_to_id(s) for s in SPECIALS[:2]] == [0, 1]
    pairs = [] if args.tiny else chat_pairs()
    data = Data(tok, train_files, pairs, 64 if args.tiny else args.seq, args.seed)
    print(f"tokenizer: {vocab} tokens; {len(data.stream) / 1e6:.2f}M training tokens; {len(pairs)} chat pairs",
          flush=True)

    cfg_dict = model_config(args.tiny, vocab)
    cfg = ModelConfig.from_dict(cfg_dict)
    model = build_model(cfg, device, args.seed)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    balancer = LoadBalancer(model, rate=1e-3)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu",
                                                                                                    enabled=False)
    history = []
    budget = 60 * args.minutes if args.minutes else None  # seconds for both stages (80% / 20%)

    def lr_at(progress):  # warm-up, then cosine from lr to lr/10 over the whole run
        if progress < 0.02:
            return args.lr * max(progress, 1e-3) / 0.02
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    model.train()
    t0 = time.time()
    steps_done = {"code": 0, "chat": 0}
    for stage, steps, share, chat_share in (("code", args.steps, 0.8, 0.0), ("chat", args.chat_steps, 0.2, 0.6)):
        stage_start, stage_budget = time.time(), budget * share if budget else None
        for i in range(steps):
            frac = i / steps
            if stage_budget:
                frac = max(frac, (time.time() - stage_start) / stage_budget)
                if frac >= 1.0:
                    break
            progress = 0.8 * frac if stage == "code" else 0.8 + 0.2 * frac
            for g in opt.param_groups:
                g["lr"] = lr_at(progress)
            x, y = data.batch(args.batch, chat_share, device)
            with amp:
                main_loss, mtp_loss = losses(model, x, y)
                loss = main_loss + 0.3 * mtp_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            balancer.step()
            history.append(float(main_loss.detach()))
            steps_done[stage] += 1
            if i % 50 == 0 or i == steps - 1:
                print(f"{stage} step {i:5d} loss {history[-1]:.3f} mtp {float(mtp_loss.detach()):.3f} "
                      f"lr {lr_at(progress):.2e} {time.time() - t0:6.0f}s", flush=True)
    model.eval()
    result = {"steps": steps_done["code"], "chat_steps": steps_done["chat"], "train_seconds": round(time.time() - t0, 1), "params_M": round(n_params / 1e6, 2),
              "first_loss": history[0] if history else None, "last_loss": history[-1] if history else None,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "python": sys.version.split()[0], "seed": args.seed}
    with torch.no_grad(), amp:
        result["heldout_loss"] = round(heldout_loss(model, data, test_files, device, 8 if args.tiny else 64), 4)
    save(model, tok, cfg_dict, args.out)
    if args.eval:
        result.update(evaluate(args.out, tok, test_files, args.eval, str(device), args.seed))
    result["total_seconds"] = round(time.time() - t_start, 1)
    (args.out / "training_report.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
