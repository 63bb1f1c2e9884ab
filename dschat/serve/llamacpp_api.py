"""llama.cpp server's shape, which llama.vim and llama.vscode call: /infill, /completion, /tokenize, /detokenize,
/apply-template, /health and /props.

/infill: the hole is after input_prefix + prompt and before input_suffix, all of it the file's text (never read
as special tokens). The prompt is `dschat fim`'s for input_prefix and input_suffix, and `prompt` (llama.vim and
llama.vscode send the cursor line's start there) follows <｜fim▁end｜> as the beginning of the middle, where
llama.cpp puts it: typing on one line changes only the last tokens, so the shared cache serves the rest. With an
empty `prompt` the prompt is exactly `dschat fim`'s; the insertion is cut as `dschat fim` cuts it (where it starts
repeating the suffix). input_extra chunks ({filename, text}, text only: nothing is read from the server's disk)
go before the file's text in the FIM prefix, each after llama.cpp's "--- snippet ---" separator. n_predict 0 is the editors' warm-up: the prompt is prefilled into the shared cache and nothing is
generated. cache_prompt false prefills the whole prompt. tokens_cached is the number of prompt tokens that came
from the cache (timings.prompt_n the ones prefilled). t_max_predict_ms stops decoding after that long once a
line is complete. /completion reads special token text in a text prompt as those tokens; a list is token ids.
"""

from __future__ import annotations

from starlette.responses import JSONResponse, StreamingResponse

from dschat.serve import generation
from dschat.serve.common import State, collect, events, parse, prepare, seed, sse, submit
from dschat.serve.errors import ApiError, body
from dschat.serve.schemas import ApplyTemplate, Detokenize, Infill, LlamaCompletion, Tokenize


def _limit(ms: float) -> float | None:
    return ms / 1000 if ms > 0 else None


def result(state: State, o: generation.Outcome, spec: generation.GenSpec, index: int = 0) -> dict:
    s = o.stats
    prompt_n, prompt_ms = o.prompt_tokens - o.cached_tokens, 1000 * s.get("prefill_s", 0.0)
    predicted_n, predicted_ms = o.completion_tokens, 1000 * s.get("decode_s", 0.0)
    stop_type = "word" if o.stop_word is not None else "eos" if o.finish == "stop" else "limit"
    return {
        "index": index, "content": o.text, "id_slot": 0, "stop": True, "model": state.name,
        "tokens_predicted": predicted_n, "tokens_evaluated": o.prompt_tokens, "tokens_cached": o.cached_tokens,
        "stop_type": stop_type, "stopping_word": o.stop_word or "", "truncated": False,
        "generation_settings": {"n_predict": spec.max_tokens, "temperature": spec.temperature, "top_k": spec.top_k,
                                "top_p": spec.top_p, "seed": spec.seed, "n_ctx": state.context,
                                "cache_prompt": spec.reuse_cache},
        "timings": {"prompt_n": prompt_n, "prompt_ms": prompt_ms,
                    "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
                    "prompt_per_second": 1000 * prompt_n / prompt_ms if prompt_ms else 0.0,
                    "predicted_n": predicted_n, "predicted_ms": predicted_ms,
                    "predicted_per_token_ms": predicted_ms / predicted_n if predicted_n else 0.0,
                    "predicted_per_second": 1000 * predicted_n / predicted_ms if predicted_ms else 0.0},
    }


def pick(res: dict, fields: list[str] | None) -> dict:
    """llama.cpp's response_fields: only these (a/b names a nested field, kept under the name "a/b")."""
    if not fields:
        return res
    out = {}
    for name in fields:
        value, found = res, True
        for part in name.split("/"):
            if isinstance(value, dict) and part in value:
                value = value[part]
            else:
                found = False
                break
        if found:
            out[name] = value
    return out


def sampling(state: State, req, spec: generation.GenSpec, fim: bool):
    spec.temperature = (0.0 if fim else state.temperature) if req.temperature is None else req.temperature
    spec.top_k = req.top_k or 0
    spec.top_p = 1.0 if req.top_p is None else req.top_p
    spec.seed = seed(req.seed)
    spec.stop = tuple(s for s in req.stop if s)
    spec.ignore_eos, spec.reuse_cache = req.ignore_eos, req.cache_prompt
    spec.time_limit_s = _limit(req.t_max_predict_ms)
    spec.warm_up = req.n_predict == 0


async def respond(request, state: State, req, specs: list[generation.GenSpec]):
    job = submit(state, specs)
    if not req.stream:
        outcomes = await collect(request, state, job)
        results = [pick(result(state, o, s, i), req.response_fields) for i, (o, s) in enumerate(zip(outcomes, specs))]
        return JSONResponse(results[0] if len(results) == 1 else results)

    async def stream():
        try:
            async for kind, value in events(request, state, job):
                if kind == "piece":
                    yield sse({"index": value[0], "content": value[1], "stop": False, "id_slot": 0})
                else:
                    for i, (o, s) in enumerate(zip(value, specs)):
                        yield sse(pick(result(state, o, s, i), req.response_fields) | {"content": ""})
        except ApiError as e:
            yield sse(body("llamacpp", e))

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def infill(request):
    state: State = request.app.state.dschat
    req = await parse(request, Infill)
    n, budget = state.fim_length(None if req.n_predict <= 0 else req.n_predict, "n_predict")
    prefix = req.input_prefix + req.prompt
    ids, suffix = await prepare(generation.fim_spec_ids, state.tok, req.input_prefix, req.input_suffix, budget,
                                [(c.filename, c.text) for c in req.input_extra], req.prompt)
    specs = []
    for i in range(1 if req.n_predict == 0 else req.n_cmpl):
        spec = generation.fim_spec(state.tok, ids, suffix, n, prefix)
        sampling(state, req, spec, fim=True)
        if spec.seed is not None:
            spec.seed = (spec.seed + i) % 2**63
        specs.append(spec)
    return await respond(request, state, req, specs)


async def completion(request):
    state: State = request.app.state.dschat
    req = await parse(request, LlamaCompletion)
    ids = await prepare(generation.text_ids, state.tok, req.prompt)
    asked = None if req.n_predict <= 0 else req.n_predict
    spec = generation.GenSpec(ids=ids, max_tokens=state.max_tokens(asked, len(ids), clip=True, param="n_predict"))
    sampling(state, req, spec, fim=False)
    return await respond(request, state, req, [spec])


async def tokenize(request):
    state: State = request.app.state.dschat
    req = await parse(request, Tokenize)
    tok = state.tok

    def encode():
        ids = tok.encode(req.content) if req.parse_special else tok.encode_plain(req.content)
        if req.add_special and tok.bos_token_id is not None and tok.add_bos_token:
            ids = [tok.bos_token_id] + ids
        return ids

    ids = await prepare(encode)
    if req.with_pieces:
        return JSONResponse({"tokens": [{"id": i, "piece": tok.decode([i])} for i in ids]})
    return JSONResponse({"tokens": ids})


async def detokenize(request):
    state: State = request.app.state.dschat
    req = await parse(request, Detokenize)
    bad = [i for i in req.tokens if not 0 <= i < len(state.tok)]
    if bad:
        raise ApiError(422, f"tokens: {bad[0]} is outside the vocabulary (size {len(state.tok)})", param="tokens")
    return JSONResponse({"content": state.tok.decode(req.tokens)})


async def apply_template(request):
    state: State = request.app.state.dschat
    req = await parse(request, ApplyTemplate)
    messages = [{"role": "system" if m.role == "developer" else m.role,
                 "content": generation.message_text(m.content)} for m in req.messages]

    def render():
        from dschat.conversation.template import TemplateError, chat_prompt

        try:
            return chat_prompt(state.tok, messages)[0]
        except TemplateError as e:
            raise generation.PromptError(str(e)) from None

    return JSONResponse({"prompt": await prepare(render)})


async def health(request):
    state: State = request.app.state.dschat
    return JSONResponse({"status": "ok", **state.scheduler.status()})


async def props(request):
    state: State = request.app.state.dschat
    return JSONResponse({"default_generation_settings": {"n_ctx": state.context, "params": {
        "n_predict": -1, "temperature": state.temperature, "top_p": state.top_p}},
        "total_slots": 1, "model_path": state.name, "chat_template": state.tok.chat_template or "",
        "fim": state.tok.fim is not None, "build_info": "dschat"})


ROUTES = [("/infill", infill, ["POST"]), ("/completion", completion, ["POST"]),
          ("/completions", completion, ["POST"]), ("/tokenize", tokenize, ["POST"]),
          ("/detokenize", detokenize, ["POST"]), ("/apply-template", apply_template, ["POST"]),
          ("/health", health, ["GET"]), ("/props", props, ["GET"])]
