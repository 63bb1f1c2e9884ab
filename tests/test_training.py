"""The demo model's training pipeline (training/): FIM examples are what `dschat fim` sends, chat examples what
`echo Q | dschat` sends, data is a pure function of the seed, a cut-off run resumes exactly, every size preset
fits the package, and --tiny runs the whole pipeline end to end."""

from __future__ import annotations

import copy
import json
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dschat.conversation.chat import Chat
from dschat.runtime import DEMO_DIR
from dschat.engine import Engine, SamplingParams
from dschat.engine.config import ModelConfig
from dschat.engine.model import Transformer
from dschat.fim.core import fill
from dschat.training import train_demo
from dschat.training.batches import Batches
from dschat.training.chat_data import CHAT_MODULES, chat_example, chat_pairs, eval_questions
from dschat.training.corpus import split, stdlib_files, stdlib_root
from dschat.training.export import shipped_bytes
from dschat.training.fim_data import fim_example, line_table, pick_hole, token_counter
from dschat.training.loop import MEASURE_AFTER, MEASURE_STEPS, Trainer
from dschat.training.model import MAX_SHIPPED_MB, SIZES, build_model, model_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "train_demo.py"


class Recording(Engine):
    """The real engine, remembering the prompt ids it was last asked to continue."""

    def generate(self, ids, params=None):
        self.sent = list(ids)
        return super().generate(ids, params)


@pytest.fixture(scope="module")
def demo():
    return Recording.from_pretrained(DEMO_DIR, dtype=torch.float32, speculative="none")


def tiny_args(**over):
    args = train_demo.parser().parse_args(["--tiny", "--dry-run", "--batch", "4", "--warmup", "2", *over.pop("argv", [])])
    train_demo.settle(args)
    for k, v in over.items():
        setattr(args, k, v)
    return args


@pytest.fixture
def one_thread():
    """Tiny matrices train fastest on one thread (and a shared machine stays usable)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    """(args, tokenizer, data) of a --tiny run."""
    args = tiny_args()
    _, _, tok, data = train_demo.prepare(args)
    return args, tok, data


@pytest.mark.parametrize("kind", ["line", "rest", "block"])
def test_a_fim_example_is_exactly_what_dschat_fim_sends(demo, kind):
    tok = demo.tokenizer
    text = (stdlib_root() / "shlex.py").read_text()  # long enough that the prompt is trimmed to the budget
    rng = random.Random(kind)
    for _ in range(2):
        a, b = pick_hole(line_table(text), rng, kind)
        ids, labels = fim_example(tok, text, (a, b), 300, 64, token_counter(tok))
        fill(demo, tok, text[:a] + text[b:], a, SimpleNamespace(context=300, temperature=0.0, top_p=1.0, seed=None,
                                                                max_tokens=1))
        n = len(demo.sent)
        assert ids[:n] == demo.sent and demo.sent[0] == tok.bos_token_id and 250 < n < 340
        assert labels[:n] == [-100] * n and labels[n:] == ids[n:]
        assert tok.decode(ids[n:]) == text[a:b] + tok.eos_token and ("\n" in text[a:b]) == (kind == "block")


def test_special_token_strings_in_a_file_stay_text_as_in_dschat_fim(demo):
    tok = demo.tokenizer
    text = "".join(f"marks_{i} = '<｜fim▁hole｜><｜end▁of▁sentence｜>'\n" for i in range(80))
    a, b = pick_hole(line_table(text), random.Random(1), "line")
    ids, _ = fim_example(tok, text, (a, b), 300, 64, token_counter(tok))
    fill(demo, tok, text[:a] + text[b:], a, SimpleNamespace(context=300, temperature=0.0, top_p=1.0, seed=None,
                                                            max_tokens=1))
    n = len(demo.sent)
    assert ids[:n] == demo.sent and 200 < n < 340
    assert "<｜fim▁hole｜>" in text[a:b] and not set(ids[n:-1]) & tok.special_ids and ids[-1] == tok.eos_token_id


def test_hole_kinds_cut_lines_as_an_editor_would():
    text = "def f(x):\n    y = x + 1\n    return y\n"
    rng = random.Random(0)
    seen = {kind: {text[a:b] for a, b in filter(None, (pick_hole(line_table(text), rng, kind) for _ in range(40)))}
            for kind in ("line", "rest", "block")}
    assert seen["line"] == {"def f(x):", "y = x + 1", "return y"}
    assert "x + 1" in seen["rest"] and all(s in text and "\n" not in s for s in seen["rest"])
    assert "y = x + 1\n    return y" in seen["block"] and all("\n" in s for s in seen["block"])


def test_a_chat_example_is_exactly_what_the_chat_sends(demo):
    q = "What does shlex.split do?"
    ids, labels = chat_example(demo.tokenizer, q, "It splits.")
    prompt = Chat(demo.tokenizer).turn(q).prompt_ids
    assert ids[:len(prompt)] == prompt and labels[:len(prompt)] == [-100] * len(prompt)
    assert demo.tokenizer.decode(ids[len(prompt):]) == "It splits." + demo.tokenizer.eos_token


def test_the_held_out_chat_questions_are_never_trained_on():
    questions = eval_questions()
    assert len(questions) == 20
    for q in questions:  # an answer cannot score by repeating the question
        assert q["expect"] and not any(name.lower() in q["question"].lower() for name in q["expect"])
    train, _ = split(stdlib_files(tests=False))
    pairs = chat_pairs(CHAT_MODULES[:40], train)
    asked = {q.lower() for q, _ in pairs}
    assert not asked & {q["question"].lower() for q in questions}
    styles = ("How do I ", "Write a function that ", "What does ")
    for style in styles:  # the held-out styles are trained, answered with real code
        assert any(q.startswith(style) and "```python" in a for q, a in pairs), style


def test_the_same_seed_gives_the_same_data_and_batches(tiny):
    args, tok, data = tiny
    _, _, tok2, again = train_demo.prepare(args)
    assert tok2.tk.to_str() == tok.tk.to_str()
    for step in (0, 3):
        x, y = data.batch(step, 100, 4)
        x2, y2 = again.batch(step, 100, 4)
        assert torch.equal(x, x2) and torch.equal(y, y2)
    kinds = {kind for step in range(6) for _, _, kind in data.rows(step, 100, 4)}
    assert kinds == {"code", "fim", "chat"}
    _, _, _, reseeded = train_demo.prepare(tiny_args(argv=["--seed", "7"]))
    assert not torch.equal(reseeded.batch(0, 100, 4)[0], data.batch(0, 100, 4)[0])
    # worker processes deal the same batches, in order
    loader = torch.utils.data.DataLoader(Batches(data, 2, 5, 4), batch_size=None, num_workers=2)
    for step, (x, y) in zip(range(2, 5), loader):
        assert torch.equal(x, data.batch(step, 5, 4)[0]) and torch.equal(y, data.batch(step, 5, 4)[1])


def test_rows_fit_and_learn_only_what_they_should(tiny):
    args, tok, data = tiny
    for step in range(4):
        x, y = data.batch(step, 100, 4)
        assert x.shape == y.shape == (4, args.seq)
        assert ((y == -100) | (y < len(tok))).all()
    fim = next(r for s in range(9) for r in data.rows(s, 100, 4) if r[2] == "fim")
    learnt = [t for t in fim[1] if t != -100]
    assert learnt[-1] == tok.eos_token_id and len(learnt) <= args.max_middle


def test_a_cut_off_run_resumes_exactly(tiny, one_thread):
    args, tok, data = tiny
    args = tiny_args(steps=8, log_every=100, save_minutes=0.0)
    cfg = ModelConfig.from_dict(model_config("tiny", len(tok), 256))

    def trainer():
        return Trainer(build_model(cfg, "cpu", args.seed), data, args, log=lambda s: None)

    whole = trainer()
    whole.run(lambda t: None)
    saved = {}

    def cut_off(t):  # the state file is written after every step; the run dies after step 4
        saved["state"] = copy.deepcopy(t.state({}))
        if t.step == 4:
            raise KeyboardInterrupt

    first = trainer()
    with pytest.raises(KeyboardInterrupt):
        first.run(cut_off)
    second = trainer()
    second.restore(saved["state"])
    second.run(lambda t: None)
    assert second.history == whole.history and len(whole.history) == 8
    for k, v in whole.model.state_dict().items():
        assert torch.equal(v, second.model.state_dict()[k]), k


def test_a_time_box_sizes_the_run_to_fit(tiny, one_thread):
    _, tok, data = tiny
    cfg = ModelConfig.from_dict(model_config("tiny", len(tok), 256))
    measured = MEASURE_AFTER + MEASURE_STEPS
    probe = Trainer(build_model(cfg, "cpu", 1), data, tiny_args(steps=measured, log_every=1000), log=lambda s: None)
    probe.run(lambda t: None)
    budget = 2 * probe.seconds  # time for about twice the steps it takes to size the run
    args = tiny_args(steps=100000, log_every=1000, save_minutes=100.0)
    timed = Trainer(build_model(cfg, "cpu", 1), data, args, log=lambda s: None, budget_s=budget)
    timed.run(lambda t: None)
    assert timed.fixed and measured < timed.steps < 100000 and timed.step <= timed.steps
    assert timed.seconds < budget + max(1.0, budget / 2)


@pytest.mark.parametrize("size", [s for s in SIZES if s != "tiny"])
def test_every_size_fits_the_package(size):
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_dict(model_config(size, SIZES[size]["vocab"], 8192)))
    assert shipped_bytes(model) <= MAX_SHIPPED_MB * 2**20


def test_dump_data_and_dry_run_show_what_would_be_trained(capsys, tmp_path):
    assert train_demo.main(["--tiny", "--dump-data", "3"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["row"] for r in rows] == [0, 1, 2] and all(r["learnt"] and r["kind"] for r in rows)
    assert train_demo.main(["--tiny", "--dry-run", "--out", str(tmp_path / "m")]) == 0
    assert "params_M" in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_bad_options_are_one_line_errors(tmp_path, capsys):
    for argv in (["--tiny", "--out", str(tmp_path / "m"), "--resume"], ["--evaluate", str(tmp_path)],
                 ["--tiny", "--out", str(tmp_path / "m"), "--seq", "50"], ["--tiny"]):
        assert train_demo.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("train_demo: ") and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def test_tiny_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "tiny"
    r = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--steps", "30", "--batch", "8", "--warmup", "2",
                        "--eval", "2", "--starts", "1", "--chat-tokens", "4", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "training_report.json").read_text())
    assert report["steps"] == report["planned_steps"] == 30 and "--steps 30" in report["reproduce"]
    assert report["last_loss"] < report["first_loss"] - 0.5
    assert report["fim_single_line"]["holes"] == report["fim_multi_line"]["holes"] == 2
    assert report["chat"]["questions"] == 20 and report["start_to_first_token"]["median_s"] > 0
    assert 0 <= report["mtp_k1"]["acceptance"] <= 1 and report["heldout_loss"] > 0
    sums = dict(reversed(line.split()) for line in (out / "SHA256SUMS").read_text().splitlines())
    assert set(sums) == {p.name for p in out.glob("*.safetensors")}
    assert not list(tmp_path.glob("*.state.pt")) and not list(tmp_path.glob("*.new"))
    eng = Engine.from_pretrained(out, dtype=torch.float32, speculative="mtp")  # the MTP layer loads
    assert len(eng.model.mtp) == 1 and eng.tokenizer.fim is not None
    assert len(list(eng.generate([0, 5, 6], SamplingParams(max_tokens=4, ignore_eos=True)))) == 4
