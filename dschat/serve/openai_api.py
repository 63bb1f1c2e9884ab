"""OpenAI's shape: /v1/chat/completions, /v1/completions (with `suffix`: fill-in-the-middle) and /v1/models.

An R1-style model's reasoning (inside <think> ... </think>, opened by its template or its reply) comes in
`reasoning_content` (stream: delta.reasoning_content), the answer in `content`, as DeepSeek's API has it.

Prompt text: the chat endpoint renders the model's template, and FIM or role token text inside a message stays
text. /v1/completions without a suffix reads special token text in the prompt as those tokens (a client may send
a whole prompt it built, FIM tokens included, as llama-server and vLLM read it); with a suffix the prompt and
the suffix are the file's text, encoded as text, as `dschat fim` does.
"""

from __future__ import annotations

import time
import uuid

from starlette.responses import JSONResponse, StreamingResponse

from dschat.conversation.reasoning import Reasoning, opened, thinks
from dschat.serve import generation
from dschat.serve.common import State, collect, events, parse, prepare, seed, sse, submit
from dschat.serve.errors import ApiError, body
from dschat.serve.schemas import OpenAIChat, OpenAICompletion, stop_list


def usage(o: generation.Outcome) -> dict:
    return {"prompt_tokens": o.prompt_tokens, "completion_tokens": o.completion_tokens,
            "total_tokens": o.prompt_tokens + o.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": o.cached_tokens}}


def finish_reason(o: generation.Outcome) -> str:
    return "length" if o.finish == "length" else "stop"


def _stops(req) -> tuple[str, ...]:
    try:
        return stop_list(req.stop)
    except ValueError as e:
        raise ApiError(422, f"stop: {e}", param="stop", code="invalid_value") from None


def streamed(request, state: State, job, req, head: dict, opening, piece, closing, finish) -> StreamingResponse:
    """Both endpoints' SSE stream: the `opening` choices, `piece(text)`'s for each piece, at the end
    `closing()`'s and `finish(outcome)`, then the usage (stream_options.include_usage), then [DONE]; an error
    after the stream began is its last event."""
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(choices):
        return sse({**head, "choices": choices})

    async def stream():
        for choice in opening:
            yield chunk([choice])
        try:
            async for kind, value in events(request, state, job):
                if kind == "piece":
                    for choice in piece(value[1]):
                        yield chunk([choice])
                else:
                    for choice in closing():
                        yield chunk([choice])
                    yield chunk([finish(value)])
                    if include_usage:
                        yield sse({**head, "choices": [], "usage": usage(value)})
        except ApiError as e:
            yield sse(body("openai", e))
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def chat_completions(request):
    state: State = request.app.state.dschat
    req = await parse(request, OpenAIChat)
    state.check_model(req.model)
    messages = [{"role": "system" if m.role == "developer" else m.role,
                 "content": generation.message_text(m.content)} for m in req.messages]
    text, ids = await prepare(generation.chat_text_ids, state.tok, messages)
    reasoning = thinks(state.tok)
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    spec = generation.GenSpec(
        ids=ids, max_tokens=state.max_tokens(asked, len(ids), clip=False),
        temperature=state.temperature if req.temperature is None else req.temperature,
        top_p=state.top_p if req.top_p is None else req.top_p, seed=seed(req.seed), stop=_stops(req), chat=True)
    job = submit(state, spec)
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": state.name,
            "system_fingerprint": state.engine.fingerprint}
    split = Reasoning(opened(text)) if reasoning else None
    if not req.stream:
        o = await collect(request, state, job)
        message = {"role": "assistant", "content": o.text}
        if split:
            (r1, a1), (r2, a2) = split.feed(o.text), split.flush()
            message = {"role": "assistant", "content": a1 + a2, "reasoning_content": r1 + r2}
        return JSONResponse({**head, "object": "chat.completion", "choices": [{
            "index": 0, "message": message, "finish_reason": finish_reason(o), "logprobs": None}], "usage": usage(o)})

    def deltas(reasoning_text, answer):
        if reasoning_text:
            yield {"index": 0, "delta": {"reasoning_content": reasoning_text}, "finish_reason": None, "logprobs": None}
        if answer:
            yield {"index": 0, "delta": {"content": answer}, "finish_reason": None, "logprobs": None}

    return streamed(request, state, job, req, head,
                    opening=[{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                              "logprobs": None}],
                    piece=lambda text: deltas(*(split.feed(text) if split else ("", text))),
                    closing=lambda: deltas(*split.flush()) if split else (),
                    finish=lambda o: {"index": 0, "delta": {}, "finish_reason": finish_reason(o), "logprobs": None})


async def completions(request):
    state: State = request.app.state.dschat
    req = await parse(request, OpenAICompletion)
    state.check_model(req.model)
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise ApiError(422, "prompt: one prompt per request", param="prompt", code="invalid_value")
        prompt = prompt[0]
    temperature = state.temperature if req.temperature is None else req.temperature
    if req.suffix is not None:
        if not isinstance(prompt, str):
            raise ApiError(422, "prompt: text, with a suffix", param="prompt", code="invalid_value")
        n, budget = state.fim_length(req.max_tokens, "max_tokens")
        ids, suffix = await prepare(generation.fim_spec_ids, state.tok, prompt, req.suffix, budget)
        spec = generation.fim_spec(state.tok, ids, suffix, n, prompt)
        spec.temperature = 0.0 if req.temperature is None else req.temperature
    else:
        ids = await prepare(generation.text_ids, state.tok, prompt)
        spec = generation.GenSpec(ids=ids, max_tokens=state.max_tokens(req.max_tokens, len(ids), clip=False),
                                  temperature=temperature)
    spec.top_p = state.top_p if req.top_p is None else req.top_p
    spec.seed, spec.stop = seed(req.seed), _stops(req)
    echo = prompt if req.echo and isinstance(prompt, str) and req.suffix is None else ""
    job = submit(state, spec)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": state.name, "system_fingerprint": state.engine.fingerprint}
    if not req.stream:
        o = await collect(request, state, job)
        return JSONResponse({**head, "choices": [{"index": 0, "text": echo + o.text, "finish_reason": finish_reason(o),
                                                  "logprobs": None}], "usage": usage(o)})
    return streamed(request, state, job, req, head,
                    opening=[{"index": 0, "text": echo, "finish_reason": None, "logprobs": None}] if echo else [],
                    piece=lambda text: [{"index": 0, "text": text, "finish_reason": None, "logprobs": None}],
                    closing=lambda: (),
                    finish=lambda o: {"index": 0, "text": "", "finish_reason": finish_reason(o), "logprobs": None})


async def models(request):
    state: State = request.app.state.dschat
    return JSONResponse({"object": "list", "data": [{
        "id": state.name, "object": "model", "created": state.created, "owned_by": "dschat",
        "meta": {"n_ctx_train": state.context, "fim": state.tok.fim is not None}}]})


ROUTES = [("/v1/chat/completions", chat_completions, ["POST"]), ("/v1/completions", completions, ["POST"]),
          ("/v1/models", models, ["GET"])]
