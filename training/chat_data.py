"""Chat data generated from the standard library itself, with `inspect`.

For each public function and class of CHAT_MODULES (those defined in held-out files excepted): what it does,
how to use it, which module has it (from signatures and docstrings), and held-out-style questions answered
with real code from the library: "How do I <what its docstring says it does>?" (the call, with a real call
site from the training files), "What does X return?", and "Write a function that ..." (the library's own
source of the function). The 20 questions of chat_eval.json are never among them."""

from __future__ import annotations

import importlib
import inspect
import json
import re
import textwrap
import warnings
from pathlib import Path

from dschat.conversation.template import chat_prompt

from .corpus import is_held_out_source, stdlib_root

EVAL_FILE = Path(__file__).with_name("chat_eval.json")

CHAT_MODULES = """os os.path sys json re collections itertools functools pathlib subprocess shutil math random
datetime time typing dataclasses string textwrap urllib.parse urllib.request http.client csv sqlite3 hashlib
base64 logging argparse unittest io struct heapq bisect copy glob fnmatch tempfile zipfile tarfile gzip bz2
lzma pickle enum abc contextlib threading queue asyncio socket select signal statistics fractions decimal
operator inspect traceback warnings weakref uuid secrets platform locale calendar pprint difflib shlex
configparser xml.etree.ElementTree html html.parser email json.decoder array codecs unicodedata zlib hmac
getpass optparse sched shelve dbm timeit cProfile pstats dis ast tokenize keyword types numbers cmath
ipaddress mimetypes binascii quopri smtplib ftplib imaplib poplib socketserver http.server wsgiref
concurrent.futures multiprocessing filecmp fileinput stat linecache graphlib zoneinfo""".split()
TINY_MODULES = ["json", "os.path", "shlex"]

VERBS = set("""return get join split convert create make read write open close copy move remove delete find
check test compute calculate parse format encode decode compress decompress build add set run execute send
receive load dump generate print sort search replace wait start stop change normalize normalise expand
translate escape quote unquote register update pack unpack hash list count apply call shuffle choose raise
insert append extend strip wrap fill match compile fetch save store round truncate construct""".split())
MAX_SOURCE_LINES = 30
CALL = re.compile(r"(?<![\w.])((?:[A-Za-z_]\w*\.)+[A-Za-z_]\w*)\(")


def eval_questions() -> list[dict]:
    """The fixed held-out chat questions: [{"question", "expect": [names any of which is right]}]."""
    return json.loads(EVAL_FILE.read_text(encoding="utf-8"))


def summary(doc: str | None) -> str | None:
    if not doc:
        return None
    para = " ".join(doc.strip().split("\n\n")[0].split())
    return para if 12 <= len(para) <= 600 else None


def first_sentence(s: str) -> str:
    return re.split(r"(?<=[.!?])\s", s, maxsplit=1)[0].rstrip(".")


def third_person(verb: str) -> str:
    if verb.endswith("y") and verb[-2:-1] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + ("es" if verb.endswith(("s", "sh", "ch", "x", "o")) else "s")


def task(s: str) -> tuple[str, str] | None:
    """("get the absolute path", "gets the absolute path") from a docstring starting with a verb."""
    words = first_sentence(s).split(" ", 1)
    verb = words[0].lower()
    if verb.endswith("s") and verb[:-1] in VERBS:
        verb = verb[:-1]
    if verb not in VERBS or len(words) < 2:
        return None
    verb = "get" if verb == "return" else verb
    return f"{verb} {words[1]}", f"{third_person(verb)} {words[1]}"


def call_sites(files: list[tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """Dotted name -> (file, a line of real code that calls it), first occurrence in the training files."""
    sites: dict[str, tuple[str, str]] = {}
    for rel, text in files:
        for line in text.split("\n"):
            code = line.strip()
            if len(code) > 100 or code.startswith("#"):
                continue
            for name in CALL.findall(code):
                sites.setdefault(name, (rel, code))
    return sites


def example(qual: str, sites) -> str:
    if qual not in sites:
        return ""
    rel, code = sites[qual]
    return f"\n\nFor example, in `{rel}`:\n```python\n{code}\n```"


def source(obj) -> str | None:
    """The library's own source of a pure-Python function, when it is short."""
    if not inspect.isfunction(obj):
        return None
    try:
        text = textwrap.dedent(inspect.getsource(obj))
    except (OSError, TypeError):
        return None
    return text.rstrip() if text.count("\n") < MAX_SOURCE_LINES else None


def public_objects(mod):
    for name, obj in sorted(vars(mod).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
            continue
        if inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj):
            yield name, obj


def object_pairs(modname: str, name: str, obj, sites) -> list[tuple[str, str]]:
    s = summary(inspect.getdoc(obj))
    if not s:
        return []
    qual = f"{modname}.{name}"
    try:
        call = f"{qual}{inspect.signature(obj)}"
    except (TypeError, ValueError):
        call = f"{qual}(...)"
    kind = "class" if inspect.isclass(obj) else "function"
    pairs = [(f"What does {qual} do?", f"`{call}` {s}"),
             (f"How do I use {qual}?", f"Call `{call}`. {s}"),
             (f"Which module has {name}?", f"`{name}` is a {kind} in the `{modname}` module. {s}")]
    todo = task(s)
    if todo:
        pairs.append((f"How do I {todo[0]}?", f"Use `{call}`. {s}{example(qual, sites)}"))
        code = source(obj)
        if code:
            rel = Path(inspect.getsourcefile(obj)).relative_to(stdlib_root())
            pairs.append((f"Write a function that {todo[1]}.",
                          f"Here is how the standard library does it (`{qual}`, in `{rel}`):\n```python\n{code}\n```"))
    returns = next((x for x in re.split(r"(?<=\.)\s", s) if x.startswith(("Return ", "Returns "))), None)
    if returns and kind == "function":
        rest = returns.split(" ", 1)[1].rstrip(".")
        pairs.append((f"What does {qual} return?", f"`{call}` returns {rest}.{example(qual, sites)}"))
    return pairs


def module_pairs(modname: str, sites) -> list[tuple[str, str]]:
    try:
        mod = importlib.import_module(modname)
    except Exception:  # a module this platform lacks
        return []
    if is_held_out_source(getattr(mod, "__file__", None)):
        return []
    pairs = []
    s = summary(mod.__doc__)
    if s:
        pairs += [(f"What is the {modname} module for?", f"The `{modname}` module: {s}"),
                  (f"Tell me about {modname}.", f"`{modname}` is a standard library module. {s}")]
    for name, obj in public_objects(mod):
        try:
            held = is_held_out_source(inspect.getsourcefile(obj))
        except TypeError:  # built in: no source file
            held = False
        if not held:
            pairs += object_pairs(modname, name, obj, sites)
    return pairs


def chat_pairs(modules: list[str], train_files: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(question, answer) pairs about the library, without the held-out evaluation questions."""
    sites = call_sites(train_files)
    held = {q["question"].lower() for q in eval_questions()}
    pairs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for modname in modules:
            pairs += [p for p in module_pairs(modname, sites) if p[0].lower() not in held]
    return pairs


def chat_example(tok, question: str, answer: str) -> tuple[list[int], list[int]]:
    """(ids, labels): the prompt exactly as `echo QUESTION | dschat` renders it (the model's template, its
    default system text), then the answer and end-of-sentence, which alone are learnt."""
    _, prompt = chat_prompt(tok, [{"role": "user", "content": question}])
    answer_ids = tok.encode_plain(answer) + [tok.eos_token_id]
    return prompt + answer_ids, [-100] * len(prompt) + answer_ids
