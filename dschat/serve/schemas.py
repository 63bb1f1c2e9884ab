"""The request bodies each endpoint takes, validated by pydantic. Fields a client sends that dschat does not
use (llama.vim's `samplers`, Continue's `keep_alive`, ...) are ignored; a field dschat uses must have the right
type and range, else the request is refused with the shape's own error (422)."""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_N_CMPL = 8  # /infill completions per request
MAX_STOP = 16  # stop strings per request
MAX_MESSAGES = 4096


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


Stop = Union[str, list[str], None]


# -- OpenAI -------------------------------------------------------------------------------------------------------
class ContentPart(Body):
    type: str
    text: str | None = None


class Message(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class StreamOptions(Body):
    include_usage: bool = False


class OpenAIRequest(Body):
    """What both OpenAI endpoints take besides the prompt."""
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: Stop = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)


class OpenAIChat(OpenAIRequest):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class OpenAICompletion(OpenAIRequest):
    prompt: str | list[str] | list[int] = ""
    suffix: str | None = None
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default
    echo: bool = False


# -- llama.cpp server ---------------------------------------------------------------------------------------------
class ExtraChunk(Body):
    text: str = ""
    filename: str = "tmp"


class LlamaSampling(Body):
    n_predict: int = Field(-1, ge=-1)  # -1: until a stop, at most the server's --max-tokens
    temperature: float | None = Field(None, ge=0, le=100)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP)
    ignore_eos: bool = False
    cache_prompt: bool = True
    t_max_predict_ms: float = Field(0, ge=0)
    stream: bool = False
    response_fields: list[str] | None = None
    model: str | None = None


class Infill(LlamaSampling):
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[ExtraChunk] = Field(default_factory=list, max_length=1024)
    prompt: str = ""
    n_cmpl: int = Field(1, ge=1, le=MAX_N_CMPL)


class LlamaCompletion(LlamaSampling):
    prompt: str | list[int]


class Tokenize(Body):
    content: str
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class Detokenize(Body):
    tokens: list[int]


class ApplyTemplate(Body):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)


# -- ollama -------------------------------------------------------------------------------------------------------
class OllamaOptions(Body):
    num_predict: int | None = Field(None, ge=-2)  # -1: until a stop, -2: fill the context (both: --max-tokens)
    temperature: float | None = Field(None, ge=0, le=100)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = None
    stop: Stop = None


class OllamaMessage(Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""


class OllamaRequest(Body):
    """What both ollama generation endpoints take besides the prompt."""
    model: str | None = None
    stream: bool = True
    options: OllamaOptions | None = None


class OllamaGenerate(OllamaRequest):
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    raw: bool = False


class OllamaChat(OllamaRequest):
    messages: list[OllamaMessage] = Field(default_factory=list, max_length=MAX_MESSAGES)


class OllamaShow(Body):
    model: str | None = None
    name: str | None = None


# -- dschat's own (native.py): token ids in, token ids out ---------------------------------------------------------
class NativeParams(Body):
    """The engine's SamplingParams."""
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    seed: int | None = None
    max_tokens: int = Field(256, ge=1)
    stop_token_ids: list[int] = Field(default_factory=list, max_length=MAX_STOP)
    ignore_eos: bool = False


class NativeGenerate(Body):
    ids: list[int] = Field(min_length=1)
    params: NativeParams = Field(default_factory=NativeParams)
    reuse_cache: bool = True


def stop_list(stop: Stop) -> tuple[str, ...]:
    """A stop field as a tuple of non-empty strings (at most MAX_STOP)."""
    items = [stop] if isinstance(stop, str) else list(stop or [])
    if len(items) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop strings")
    return tuple(s for s in items if s)
