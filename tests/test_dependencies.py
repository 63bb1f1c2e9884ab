"""dschat runs on what it declares (issue 27 item 13): every third-party module a chat and its continuation
import belongs to a distribution that `pip install .` brings (dschat's requirements, no test extra). numpy
was used (safetensors' torch writer needs it to save the latent cache) but not declared: without it every
saved answer failed. `.ci/run` also runs dschat in an environment of exactly those distributions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from dschat.dev.install import closure, distributions_of_modules

# Runs dschat's entry point once for each argument list (a chat, then its continuation: one process, as each
# start costs seconds), then prints the top-level modules they imported that were not there at start-up.
PROBE = r"""
import io, json, sys
before = {m.split(".")[0] for m in sys.modules}
from dschat.cli.main import main
codes = []
for args in json.loads(sys.argv[1]):
    sys.stdin = io.TextIOWrapper(io.BytesIO(b"hi\n"), encoding="utf-8")
    try:
        main(args)
        codes.append(0)
    except SystemExit as e:
        codes.append(e.code)
after = {m.split(".")[0] for m in sys.modules}
sys.__stdout__.write("\nMODULES " + json.dumps([codes, sorted(after - before)]) + "\n")
"""


def imported_by(*runs: list[str]) -> set[str]:
    r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(runs)], capture_output=True, text=True, timeout=180,
                       env=os.environ)
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("MODULES "))
    codes, modules = json.loads(line[len("MODULES "):])
    assert all(code in (0, None) for code in codes) and len(codes) == len(runs), r.stderr
    return set(modules)


def test_what_a_chat_imports_is_declared():
    modules = imported_by(["-n", "4"], ["-c", "-n", "4"])
    third_party = {m for m in modules
                   if m not in sys.stdlib_module_names and not m.startswith("_") and m != "dschat"}
    assert "torch" in third_party and "safetensors" in third_party  # the probe saw the run
    declared = closure()
    undeclared = {m: dists for m, dists in distributions_of_modules(third_party).items()
                  if dists and not dists & declared}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
