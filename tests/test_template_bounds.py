"""A chat template is the model's code: its rendering is bounded in size and time, and a template that runs
away or renders nothing is one clear error."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import assert_clean_error, call

from dschat.conversation.template import TemplateError, render
from dschat.conversation.template_bounds import BoundedEnvironment, TemplateLimit, render_bounded

USER = [{"role": "user", "content": "hi"}]
BIG = 20_000_000  # past the 8 Mi-character limit, yet small enough to build if the limit were missing


@pytest.mark.parametrize("template", [
    f"{{{{ 'x' * {BIG} }}}}",
    f"{{{{ {BIG} * 'x' }}}}",
    f"{{{{ 'x' | center({BIG}) }}}}",
    f"{{{{ 'x'.ljust({BIG}) }}}}",
    "{{ 2 ** (10 ** 8) }}",
    # values doubled in a loop: by `~`, `+`, a filter, a namespace attribute
    "{% set s = 'x' %}" + "{% set s = s ~ s %}" * 25 + "{{ s }}",
    "{% set s = 'x' %}" + "{% set s = s + s %}" * 25 + "{{ s }}",
    "{% set s = 'x' %}" + "{% set s = s | replace('x', 'xx') %}" * 25 + "{{ s }}",
    "{% set ns = namespace(s='x') %}{% for i in range(25) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
], ids=["str*n", "n*str", "center", "ljust", "pow", "doubled~", "doubled+", "replace", "namespace"])
def test_values_past_the_size_limit_are_refused(template):
    with pytest.raises(TemplateError, match=r"chat template was stopped: .*limit"):
        render(template, USER)


def test_the_rendered_size_is_capped():
    template = BoundedEnvironment().from_string("{% for i in range(2000) %}xx{% endfor %}")
    assert render_bounded(template, max_chars=4000) == "xx" * 2000
    with pytest.raises(TemplateLimit, match="rendered more than the limit of 3,999 characters"):
        render_bounded(template, max_chars=3999)


@pytest.mark.parametrize("loops", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% set s = 'x' * 100000 %}{% for c in s %}{% for d in s %}{% endfor %}{% endfor %}",
], ids=["ranges", "strings"])
def test_the_render_time_is_capped(loops):
    with pytest.raises(TemplateLimit, match="time limit of 0.3 s"):
        render_bounded(BoundedEnvironment().from_string(loops), max_seconds=0.3)


def test_ordinary_templates_render_as_before():
    t = ("{% for m in messages %}{{ loop.index }}/{{ loop.length }} {{ m.role | upper }}: {{ m.content ~ '!' }}"
         "{% if loop.last %}.{% endif %}{% else %}none{% endfor %}{{ 'ab' | center(6) }}{{ 2 ** 10 }}")
    assert render(t, USER * 2) == "1/2 USER: hi!2/2 USER: hi!.  ab  1024"


@pytest.fixture
def model_with_template(chat_models, tmp_path):
    """The tiny V3 chat model's tokenizer with another chat template (no weights: --show-prompt needs none)."""
    def make(template):
        d = tmp_path / "model"
        d.mkdir()
        for name in ("config.json", "tokenizer.json"):
            shutil.copy(chat_models["v3"] / name, d / name)
        config = json.loads((chat_models["v3"] / "tokenizer_config.json").read_text())
        (d / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
        return d
    return make


@pytest.mark.parametrize("template, needle", [
    ("{{ 'x' * 10**10 }}", "chat template was stopped: `*` would build a value past the limit"),
    ("{% if false %}{{ messages }}{% endif %}  \n", "chat template rendered an empty prompt"),
], ids=["huge", "empty"])
def test_bad_templates_through_dschat(model_with_template, template, needle):
    r = call(["--model", str(model_with_template(template)), "--show-prompt"], stdin="hello")
    assert_clean_error(r, needle)
