"""ollama's shape, which Continue and Twinny default to: /api/generate, /api/chat, /api/show, /api/tags and
/api/version.

/api/generate with a `suffix` (even an empty one: the cursor at the end of the file) is fill-in-the-middle:
`prompt` and `suffix` are the file's text around the hole, encoded as text, the prompt `dschat fim` builds.
Without one, `raw: true` completes the prompt as written (special token text in it read as those tokens, as
ollama passes a raw prompt to the model), and `raw: false` wraps it in the model's chat template as a user
message (with `system`). /api/show's template names .Suffix when the tokenizer has FIM tokens: Continue offers
FIM (autocomplete) only then.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

from starlette.responses import JSONResponse, StreamingResponse

from dschat.serve import generation
from dschat.serve.common import State, collect, events, ndjson, parse, prepare, seed, submit
from dschat.serve.errors import ApiError, body
from dschat.serve.schemas import OllamaChat, OllamaGenerate, OllamaOptions, OllamaShow, stop_list

VERSION = "0.6.0"  # the ollama API version these routes follow


def now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def final(state: State, o: generation.Outcome, started: float) -> dict:
    s = o.stats
    return {"done": True, "done_reason": "length" if o.finish == "length" else "stop",
            "total_duration": int((time.perf_counter() - started) * 1e9), "load_duration": 0,
            "prompt_eval_count": o.prompt_tokens - o.cached_tokens,
            "prompt_eval_duration": int(s.get("prefill_s", 0.0) * 1e9),
            "eval_count": o.completion_tokens, "eval_duration": int(s.get("decode_s", 0.0) * 1e9),
            "prompt_cache_count": o.cached_tokens}


def options(state: State, opts: OllamaOptions | None, spec: generation.GenSpec, fim: bool):
    opts = opts or OllamaOptions()
    spec.temperature = (0.0 if fim else state.temperature) if opts.temperature is None else opts.temperature
    spec.top_p = (1.0 if fim else state.top_p) if opts.top_p is None else opts.top_p
    spec.top_k = opts.top_k or 0
    spec.seed = seed(opts.seed)
    try:
        spec.stop = stop_list(opts.stop)
    except ValueError as e:
        raise ApiError(422, f"options.stop: {e}") from None


def asked(opts: OllamaOptions | None) -> int | None:
    n = opts.num_predict if opts else None
    return None if n is None or n < 0 else n


async def reply(request, state: State, spec, stream: bool, key: str):
    """NDJSON lines {model, created_at, response|message, done} then the final one; or one object."""
    started = time.perf_counter()
    if spec is None:  # an empty prompt: ollama loads the model and answers done
        piece = {"role": "assistant", "content": ""} if key == "message" else ""
        return JSONResponse({"model": state.name, "created_at": now(), key: piece, "done": True,
                             "done_reason": "load"})
    job = submit(state, spec)

    def part(text):
        return {"role": "assistant", "content": text} if key == "message" else text

    if not stream:
        o = await collect(request, state, job)
        return JSONResponse({"model": state.name, "created_at": now(), key: part(o.text), **final(state, o, started)})

    async def lines():
        try:
            async for kind, value in events(request, state, job):
                if kind == "piece":
                    yield ndjson({"model": state.name, "created_at": now(), key: part(value[1]), "done": False})
                else:
                    yield ndjson({"model": state.name, "created_at": now(), key: part(""),
                                  **final(state, value, started)})
        except ApiError as e:
            yield ndjson(body("ollama", e))

    return StreamingResponse(lines(), media_type="application/x-ndjson")


async def generate(request):
    state: State = request.app.state.dschat
    req = await parse(request, OllamaGenerate)
    state.check_model(req.model, tag=True)
    if req.suffix is not None:
        n, budget = state.fim_length(asked(req.options), "options.num_predict")
        ids, suffix = await prepare(generation.fim_spec_ids, state.tok, req.prompt, req.suffix, budget)
        spec = generation.fim_spec(state.tok, ids, suffix, n, req.prompt)
        options(state, req.options, spec, fim=True)
    elif not req.prompt:
        spec = None
    else:
        if req.raw:
            ids = await prepare(generation.text_ids, state.tok, req.prompt)
        else:
            messages = ([{"role": "system", "content": req.system}] if req.system else []) + \
                       [{"role": "user", "content": req.prompt}]
            ids = await prepare(generation.chat_ids, state.tok, messages)
        spec = generation.GenSpec(ids=ids, max_tokens=state.max_tokens(asked(req.options), len(ids), clip=True,
                                                                       param="options.num_predict"),
                                  chat=not req.raw)
        options(state, req.options, spec, fim=False)
    return await reply(request, state, spec, req.stream, "response")


async def chat(request):
    state: State = request.app.state.dschat
    req = await parse(request, OllamaChat)
    state.check_model(req.model, tag=True)
    spec = None
    if req.messages:
        ids = await prepare(generation.chat_ids, state.tok, [{"role": m.role, "content": m.content}
                                                            for m in req.messages])
        spec = generation.GenSpec(ids=ids, max_tokens=state.max_tokens(asked(req.options), len(ids), clip=True,
                                                                       param="options.num_predict"), chat=True)
        options(state, req.options, spec, fim=False)
    return await reply(request, state, spec, req.stream, "message")


def details(state: State) -> dict:
    cfg = state.engine.config
    params = sum(p.numel() for p in state.engine.model.parameters())
    return {"format": "safetensors", "family": getattr(cfg, "model_type", None) or "deepseek",
            "parameter_size": f"{params / 1e9:.1f}B" if params >= 1e8 else f"{params / 1e6:.0f}M",
            "quantization_level": state.engine.quant or str(state.engine.dtype).replace("torch.", "")}


def template(state: State) -> str:
    """An ollama-style template of how prompts are built (for clients that read it; dschat uses the model's own)."""
    chat = "{{ if .System }}{{ .System }}{{ end }}<｜User｜>{{ .Prompt }}<｜Assistant｜>"
    if state.tok.fim is None:
        return chat
    begin, hole, end = generation.FIM_TOKENS
    return f"{{{{- if .Suffix }}}}{begin}{{{{ .Prompt }}}}{hole}{{{{ .Suffix }}}}{end}{{{{- else }}}}{chat}{{{{- end }}}}"


async def show(request):
    state: State = request.app.state.dschat
    req = await parse(request, OllamaShow)
    state.check_model(req.model or req.name, tag=True)
    caps = ["completion"] + (["insert"] if state.tok.fim is not None else [])
    return JSONResponse({"modelfile": f"# dschat serve\nFROM {state.name}\n", "parameters": f"num_ctx {state.context}",
                         "template": template(state), "details": details(state), "capabilities": caps,
                         "model_info": {"general.architecture": "deepseek2", "deepseek2.context_length": state.context}})


async def tags(request):
    state: State = request.app.state.dschat
    size = sum(f.stat().st_size for f in state.engine.path.glob("*.safetensors"))
    return JSONResponse({"models": [{"name": state.name, "model": state.name, "modified_at": now(), "size": size,
                                     "digest": state.engine.fingerprint, "details": details(state)}]})


async def version(request):
    return JSONResponse({"version": VERSION})


ROUTES = [("/api/generate", generate, ["POST"]), ("/api/chat", chat, ["POST"]), ("/api/show", show, ["POST"]),
          ("/api/tags", tags, ["GET"]), ("/api/version", version, ["GET"])]
