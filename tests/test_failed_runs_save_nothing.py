"""A run that fails after start-up (the prompt overflows the context window, the model's own sampling defaults
are invalid) leaves no conversation behind, so a later `-c` does not continue an empty one."""

from __future__ import annotations

import json

import pytest

from helpers import call

from dschat.history.store import Store


def assert_fails_and_saves_nothing(r, named: str):
    err = r.stderr.decode()
    assert r.returncode != 0 and "Traceback" not in err and named in err, err
    assert Store().list() == []
    cont = call(["--model", "demo", "-c"], stdin="go on")
    assert cont.returncode != 0 and b"no saved conversation" in cont.stderr


def test_a_prompt_that_overflows_the_context(small_context):  # noqa: F811
    assert_fails_and_saves_nothing(call(["--model", str(small_context)], stdin="word " * 80), "context window")


@pytest.mark.parametrize("field, value, why", [
    ("top_p", 0, "'top_p' must be a number above 0 and at most 1 (it is 0)"),
    ("top_p", 5, "'top_p' must be a number above 0 and at most 1 (it is 5)"),
    ("temperature", "x", "'temperature' must be a number (it is \"x\")"),
    ("top_k", 2.5, "'top_k' must be a whole number (it is 2.5)"),
    ("max_new_tokens", -1, "'max_new_tokens' must be a whole number at least 1 (it is -1)"),
])
def test_invalid_sampling_defaults_of_the_model(small_context, field, value, why):  # noqa: F811
    """One line naming the file and the field (the value alone said neither)."""
    (small_context / "generation_config.json").unlink(missing_ok=True)
    (small_context / "generation_config.json").write_text(json.dumps({field: value}))
    assert_fails_and_saves_nothing(call(["--model", str(small_context)], stdin="hi"),
                                   f"{small_context / 'generation_config.json'}: {why}")
