"""What every route shares: the server's state (the engine, its name, the limits, the queue), reading and
validating a body, the sampling defaults and the token budget, and a request's events from the worker."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from dschat.engine import ContextLengthError, ModelError

from dschat.conversation.context_window import ContextWindow
from dschat.conversation.session import Sampling
from dschat.errors import error_text
from dschat.serve import generation
from dschat.serve.errors import ApiError, from_validation
from dschat.serve.queue import Cancelled, QueueFull, Scheduler

FIM_CONTEXT = 4096  # the FIM prompt's token budget, as `dschat fim --context` has it
FIM_MAX_TOKENS = 256  # an insertion's default length, as `dschat fim -n` has it


@dataclass
class Limits:
    max_tokens: int = 4096  # the most any request may generate
    max_body: int = 8 * 2**20  # bytes
    queue: int = 8  # requests waiting, besides the one running


class State:
    def __init__(self, engine, names: list[str], limits: Limits, api_key: str | None = None,
                 run_token: str | None = None):
        self.engine, self.tok, self.limits, self.api_key = engine, engine.tokenizer, limits, api_key
        self.run_token = run_token  # accepted as the API key (the discovery file's, for a local dschat)
        self.name, self.names = names[0], set(names)
        self.scheduler = Scheduler(engine, limits.queue)
        self.created = int(time.time())
        # the model's sampling defaults as a chat resolves them (generation_config.json, then the built-in ones)
        defaults = Sampling().resolved(engine.generation_config, Path(engine.path) / "generation_config.json")
        self.temperature, self.top_p = defaults.temperature, defaults.top_p
        self.window = ContextWindow(engine.context_length, engine.eos_token_ids)

    @property
    def context(self) -> int:
        return self.engine.context_length

    def check_model(self, name: str | None, tag: bool = False):
        """404 unless `name` is empty or names this server's model (ollama names may end in :latest)."""
        if not name or name in self.names or (tag and name.endswith(":latest") and name[:-7] in self.names):
            return
        raise ApiError(404, f"model {name!r} not found: this server runs {self.name!r}", param="model",
                       code="model_not_found")

    def max_tokens(self, asked: int | None, prompt_len: int, clip: bool, param: str = "max_tokens") -> int:
        """The reply's length: `asked` (None: as much as fits, at most --max-tokens) within the server's cap,
        and within the context window (cut to fit when `clip`, else a 400)."""
        try:
            room = self.window.reply_room(prompt_len)
        except ContextLengthError as e:
            raise ApiError(400, str(e), param="prompt", code="context_length_exceeded") from None
        cap = self.limits.max_tokens
        if asked is None:
            return min(cap, room)
        if asked > cap:
            raise ApiError(422, f"{param} {asked}: at most {cap} on this server (dschat serve --max-tokens)",
                           param=param, code="invalid_value")
        if asked > room:
            if clip:
                return room
            raise ApiError(400, f"the prompt ({prompt_len} tokens) + {param} ({asked}) exceeds the context window "
                                f"({self.context} tokens)", param=param, code="context_length_exceeded")
        return asked

    def fim_length(self, asked: int | None, param: str) -> tuple[int, int]:
        """(max tokens, prompt budget) of a FIM request: the budget is `dschat fim`'s, less what the insertion
        needs of the context window."""
        n = FIM_MAX_TOKENS if asked is None else asked
        if n > self.limits.max_tokens:
            raise ApiError(422, f"{param} {n}: at most {self.limits.max_tokens} on this server "
                                "(dschat serve --max-tokens)", param=param, code="invalid_value")
        budget = min(FIM_CONTEXT, self.context - n - 4)
        if budget < 1:
            raise ApiError(400, f"{param} {n} leaves no room for the prompt in the context window "
                                f"({self.context} tokens)", param=param, code="context_length_exceeded")
        return n, budget


def seed(value: int | None) -> int | None:
    """A request's seed (negative: none, as llama.cpp's -1)."""
    return None if value is None or value < 0 else value % 2**63


async def parse(request, model_cls):
    raw = await request.body()
    try:
        data = json.loads(raw)
    except ValueError as e:  # UnicodeDecodeError is one
        raise ApiError(400, f"the request body is not valid JSON ({error_text(e)})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise from_validation(e) from None


async def prepare(fn, *args):
    """Build a prompt off the event loop (tokenizing a long file takes a while)."""
    try:
        return await run_in_threadpool(fn, *args)
    except generation.PromptError as e:
        raise ApiError(400, str(e), code="invalid_prompt") from None


def submit(state: State, spec: generation.GenSpec | list):
    """Queue a generation (a list of specs: run one after the other); 503 with Retry-After when full."""
    specs = spec if isinstance(spec, list) else [spec]

    def work(engine, emit, cancelled):
        results = []
        for s in specs:
            results.append(generation.run(engine, s, lambda kind, v, i=len(results): emit(kind, (i, v)), cancelled))
            if cancelled():
                break
        return results if isinstance(spec, list) else results[0]

    try:
        return state.scheduler.submit(work)
    except QueueFull as e:
        raise ApiError(503, str(e), code="queue_full", headers={"Retry-After": str(max(1, e.waiting))}) from None


async def _watch(request, state: State, job):
    """Cancel the job as soon as its client disconnects."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            state.scheduler.cancel(job)
            return


async def events(request, state: State, job):
    """("piece", (i, text)) events, then ("done", outcome); a failure raises ApiError. The job is cancelled
    when the client goes away or the consumer stops early."""
    watcher = asyncio.ensure_future(_watch(request, state, job))
    try:
        while True:
            kind, value = await job.events.get()
            if kind == "error":
                raise failure(value)
            yield kind, value
            if kind == "done":
                return
    finally:
        watcher.cancel()
        state.scheduler.cancel(job)


async def collect(request, state: State, job):
    async for kind, value in events(request, state, job):
        if kind == "done":
            return value


def failure(e: BaseException) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, Cancelled):
        return ApiError(503, str(e), code="cancelled")
    if isinstance(e, (ContextLengthError, ValueError, generation.PromptError)):
        return ApiError(400, error_text(e), code="invalid_request")
    if isinstance(e, ModelError):
        return ApiError(500, error_text(e), code="model_error")
    log(f"error: {type(e).__name__}: {error_text(e)}")
    return ApiError(500, f"internal error ({type(e).__name__}: {error_text(e)})", code="internal_error")


def log(line: str):
    try:
        sys.stderr.write(f"dschat serve: {line}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def ndjson(obj) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"
