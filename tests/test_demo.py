"""The bundled demo model: intact, loaded by the production path, and working end to end."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from helpers import run

from dschat.runtime import DEMO_DIR
from dschat.engine import Engine, SamplingParams
from dschat.training.model import MAX_SHIPPED_MB


def test_shipped_weights_match_their_recorded_checksums():
    sums = (DEMO_DIR / "SHA256SUMS").read_text().split("\n")
    recorded = dict(reversed(line.split()) for line in sums if line.strip())
    assert recorded and set(recorded) == {p.name for p in DEMO_DIR.glob("*.safetensors")}
    for name, digest in recorded.items():
        assert hashlib.sha256((DEMO_DIR / name).read_bytes()).hexdigest() == digest, name
    assert sum(p.stat().st_size for p in DEMO_DIR.iterdir()) <= MAX_SHIPPED_MB * 2**20


@pytest.fixture(scope="module")
def demo_mtp():
    """The demo loaded by the production path, with its MTP drafter (two tests use it)."""
    return Engine.from_pretrained(DEMO_DIR, dtype=torch.float32, speculative="mtp")


def test_it_is_a_v3_architecture_model_with_mtp(demo_mtp):
    cfg = json.loads((DEMO_DIR / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and cfg["num_nextn_predict_layers"] == 1
    assert cfg["scoring_func"] == "sigmoid" and cfg["topk_method"] == "noaux_tc" and cfg["first_k_dense_replace"] >= 1
    tok_cfg = json.loads((DEMO_DIR / "tokenizer_config.json").read_text())
    assert "<｜User｜>" in tok_cfg["chat_template"] and "<｜Assistant｜>" in tok_cfg["chat_template"]
    eng = demo_mtp
    assert len(eng.model.mtp) == 1
    assert eng.tokenizer.fim is not None and len(eng.tokenizer) <= 8192


# As on a user's CPU machine: outside Triton's interpreter (which the other tests run in) Triton is not imported.
AS_A_USER = {"TRITON_INTERPRET": None}


def test_chat_with_the_default_model():
    r = run(["-t", "0", "--no-save"], stdin="What does os.path.join do?", env=AS_A_USER)
    assert r.returncode == 0, r.stderr
    assert "os.path.join" in r.stdout.decode()
    assert b"demo model" in r.stderr  # it says plainly what is answering


def test_fim_with_the_demo(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("import os\n\n\ndef home():\n    return <FILL>\n")
    r = run(["fim", str(p), "--model", "demo", "--json", "-n", "16"], stdin=None, env=AS_A_USER)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["stop_reason"] in ("stop", "suffix", "length")


def test_mtp_drafts_are_accepted_and_lossless(demo_mtp):
    spec = demo_mtp
    plain = Engine.from_pretrained(DEMO_DIR, dtype=torch.float32, speculative="none")
    tok = spec.tokenizer
    ids = [tok.bos_token_id] + tok.encode("import os\nimport sys\n\n\ndef main(argv=None):\n    ")
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    out = list(spec.generate(ids, params))
    assert out == list(plain.generate(ids, params))
    assert spec.stats.draft_tokens > 0 and spec.stats.accepted_tokens > 0.3 * spec.stats.draft_tokens


def test_help_says_what_the_demo_is():
    text = run(["--help"], stdin=None).stdout.decode()
    assert "bundled demo model" in text and "not a DeepSeek release" in text.replace("\n", " ")
