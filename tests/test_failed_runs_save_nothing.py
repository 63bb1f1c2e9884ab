"""A run that fails after start-up (the prompt overflows the context window, the model's own sampling defaults
are invalid) leaves no conversation behind, so a later `-c` does not continue an empty one."""

from __future__ import annotations

import json

from helpers import call

from dschat.store import Store


def assert_fails_and_saves_nothing(r, named: str):
    err = r.stderr.decode()
    assert r.returncode != 0 and "Traceback" not in err and named in err, err
    assert Store().list() == []
    cont = call(["--model", "demo", "-c"], stdin="go on")
    assert cont.returncode != 0 and b"no saved conversation" in cont.stderr


def test_a_prompt_that_overflows_the_context(small_context):  # noqa: F811
    assert_fails_and_saves_nothing(call(["--model", str(small_context)], stdin="word " * 80), "context window")


def test_invalid_sampling_defaults_of_the_model(small_context):  # noqa: F811
    (small_context / "generation_config.json").unlink(missing_ok=True)
    (small_context / "generation_config.json").write_text(json.dumps({"top_p": 0}))
    assert_fails_and_saves_nothing(call(["--model", str(small_context)], stdin="hi"), "top_p")
