"""The config file: the documented example loads, mistakes are one-line errors, saving keeps the rest."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import call

from dschat.settings.config import ConfigError, Settings

USAGE = Path(__file__).resolve().parents[1] / "docs" / "usage.md"


def readme_config() -> str:
    text = USAGE.read_text(encoding="utf-8")
    section = text[text.index("### Settings"):]
    return re.search(r"```toml\n(.*?)```", section, re.S).group(1)


def test_the_documented_example_loads(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(readme_config())
    s = Settings.load(path)
    assert s.model == "deepseek-ai/DeepSeek-V2-Lite-Chat" and s.theme == "deepseek-dark"
    assert s.code_style == "monokai" and s.temperature == 0.3 and s.max_tokens == 2048
    assert s.keys == {"stop": "ctrl+s", "copy_reply": "f2"}


@pytest.mark.parametrize("body, message", [
    ('temprature = 0.3\n', "unknown setting 'temprature'"),
    ('max_tokens = "lots"\n', "'max_tokens' has the wrong type"),
    ('theme = [1\n', "cannot read the config file"),
])
def test_mistakes_are_errors_that_name_them(tmp_path, body, message):
    path = tmp_path / "config.toml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=re.escape(message)):
        Settings.load(path)


def test_save_changes_one_setting_and_keeps_comments_and_tables(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('# mine\ntheme = "nord"\n\n[keys]\nstop = "ctrl+s"\n')
    Settings.load(path).save(theme="deepseek-light", code_style="monokai")
    text = path.read_text()
    assert text.startswith("# mine\n") and 'theme = "deepseek-light"' in text
    assert text.index('code_style = "monokai"') < text.index("[keys]")
    s = Settings.load(path)
    assert (s.theme, s.code_style, s.keys) == ("deepseek-light", "monokai", {"stop": "ctrl+s"})


def test_a_bad_config_file_is_one_line_on_stderr(tmp_path):
    import os

    cfg = Path(os.environ["XDG_CONFIG_HOME"]) / "dschat" / "config.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text("temprature = 1\n")
    try:
        r = call(["hello"], stdin="")
    finally:
        cfg.unlink()
    err = r.stderr.decode()
    assert r.returncode != 0 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "temprature" in err
