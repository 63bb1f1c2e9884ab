"""dschat's own endpoint, version 1, for `dschat --server` (serve/client.py): token ids in, token ids out.

    GET  /dschat/v1/info       the model: name (and the names it answers to), directory, fingerprint, context length, end-of-sentence ids,
                               generation_config.json, device, dtype, quant, drafter, pid
    POST /dschat/v1/generate   {"ids": [...], "params": {temperature, top_p, top_k, seed, max_tokens,
                               stop_token_ids, ignore_eos}, "reuse_cache": true}
                               -> NDJSON: {"ids": [t]} per token (the first with "stats" so far: the prompt's
                               cached tokens and prefill time), then {"done": true, "stats": {...}}: the
                               generation's GenerationStats, every field; an error is {"error": {...}}

The client tokenizes (the model's own tokenizer and template, read from its directory) and the server runs the
engine, through the same queue as every request: the ids generated are the in-process engine's, and the stats
its GenerationStats. A client that disconnects stops its generation at once. Errors are OpenAI-shaped; `code`
context_length_exceeded is the engine's ContextLengthError (its message), invalid_request a bad id or parameter.
"""

from __future__ import annotations

import dataclasses
import os

from starlette.responses import JSONResponse, StreamingResponse

from dschat.engine import ContextLengthError, SamplingParams
from dschat.errors import error_text
from dschat.serve.common import State, events, ndjson, parse
from dschat.serve.errors import ApiError, body
from dschat.serve.generation import StopWhen
from dschat.serve.queue import QueueFull
from dschat.serve.schemas import NativeGenerate

VERSION = 1


def info_dict(state: State) -> dict:
    e = state.engine
    return {"version": VERSION, "pid": os.getpid(), "model": state.name, "names": sorted(state.names),
            "path": str(e.path),
            "fingerprint": e.fingerprint, "context_length": e.context_length,
            "eos_token_ids": list(e.eos_token_ids), "generation_config": dict(e.generation_config),
            "device": str(e.device), "dtype": str(e.dtype).replace("torch.", ""), "quant": e.quant,
            "speculative": e.speculative, "max_tokens": state.limits.max_tokens}


async def info(request):
    return JSONResponse(info_dict(request.app.state.dschat))


def work_of(gen, stop: StopWhen):
    """What the worker thread does: stream the Generation's ids as events until it ends or is cancelled (`stop`,
    the generation's, then reads the job's cancelled: a prefill stops between its chunks)."""
    def work(engine, emit, cancelled):
        stop.cancelled = cancelled
        try:
            first = True
            for t in gen:
                if cancelled():
                    break
                emit("token", (t, dataclasses.asdict(gen.stats) if first else None))
                first = False
        finally:
            gen.close()
        return dataclasses.asdict(gen.stats)
    return work


async def generate(request):
    state: State = request.app.state.dschat
    req = await parse(request, NativeGenerate)
    p = req.params
    if p.max_tokens > state.limits.max_tokens:
        raise ApiError(422, f"max_tokens {p.max_tokens}: at most {state.limits.max_tokens} on this server "
                            "(dschat serve --max-tokens)", param="params.max_tokens", code="invalid_value")
    try:
        params = SamplingParams(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, seed=p.seed,
                                max_tokens=p.max_tokens, stop_token_ids=tuple(p.stop_token_ids),
                                ignore_eos=p.ignore_eos)
        # the engine's own checks (ids in the vocabulary, the context window), here, before anything runs:
        # nothing is computed until the worker asks for the first token
        stop = StopWhen()
        gen = state.engine.generate(req.ids, params, reuse_cache=req.reuse_cache, stop=stop)
    except ContextLengthError as e:
        raise ApiError(400, error_text(e), param="ids", code="context_length_exceeded") from None
    except ValueError as e:
        raise ApiError(400, error_text(e), code="invalid_request") from None
    try:
        job = state.scheduler.submit(work_of(gen, stop))
    except QueueFull as e:
        gen.close()
        raise ApiError(503, str(e), code="queue_full", headers={"Retry-After": str(max(1, e.waiting))}) from None

    async def lines():
        try:
            async for kind, value in events(request, state, job):
                if kind == "token":
                    token, stats = value
                    yield ndjson({"ids": [token], "stats": stats} if stats else {"ids": [token]})
                else:
                    yield ndjson({"done": True, "stats": value})
        except ApiError as e:
            yield ndjson(body("openai", e))

    return StreamingResponse(lines(), media_type="application/x-ndjson", headers={"Cache-Control": "no-cache"})


ROUTES = [("/dschat/v1/info", info, ["GET"]), ("/dschat/v1/generate", generate, ["POST"])]
