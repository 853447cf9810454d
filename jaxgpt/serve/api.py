"""The OpenAI request bodies the server accepts, as typed models (pydantic v2, strict, no extra keys).

Why typed models: every field's JSON type is checked by one parser (booleans are not integers, strings
are not booleans, objects are not scalars, lone surrogates and nesting deeper than the parser's limit
are invalid JSON), so no value a client can send reaches the handlers in a shape they do not expect.
What a model cannot know (the checkpoint's vocabulary, the server's --max_tokens) the handler checks.
Every failure becomes one OpenAI-style 400 (`ApiError.from_validation`), as vLLM answers.
"""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import JSONResponse

MAX_STOPS = 4  # OpenAI's limit
MAX_STOP_CHARS = 64  # a stop string's length bounds the per-token work of the stop filter
MAX_TEXT_CHARS = 1 << 20  # any string field; the body limit (--max_body_bytes) is the real bound

Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
Stop = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class ApiError(Exception):
    """An answer other than 200, as OpenAI's error object."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": None}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)

    @classmethod
    def from_validation(cls, error: ValidationError) -> ApiError:
        """The first problem pydantic found, in one line: where, what was wrong (never the input echoed
        back, which can be the whole body)."""
        first = error.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        if first["type"] == "json_invalid":
            return cls(400, f"the request body is not valid JSON ({first['msg'].removeprefix('Invalid JSON: ')[:100]})")
        if first["type"] == "extra_forbidden":
            return cls(400, f"unsupported parameter {where!r}", param=where)
        more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
        return cls(400, f"{where or 'the request body'}: {first['msg']}{more}", param=where.split(".")[0] or None)


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    """What completions and chat completions share. None means the default, as OpenAI's clients send it."""

    model: Text | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=1)] | None = None  # not OpenAI's; vLLM's and llama.cpp's
    n: Annotated[int, Field(ge=1)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOPS)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**31)] | None = None
    user: Text | None = None
    # accepted only at the value that means "off": the server does not implement them
    logprobs: bool | Annotated[int, Field(ge=0)] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def unsupported(self) -> list[str]:
        """The fields set to something this server would silently ignore (they are refused instead)."""
        off: dict[str, tuple[Any, ...]] = {"logprobs": (None, False, 0), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
               "logit_bias": (None, {}), "echo": (None, False), "best_of": (None, 1), "suffix": (None, ""),
               "top_logprobs": (None, 0)}
        return [name for name, values in off.items() if name in type(self).model_fields
                and getattr(self, name) not in values]

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(Sampling):
    prompt: Text | TokenIds | Annotated[list[Text], Field(min_length=1)] | Annotated[
        list[TokenIds], Field(min_length=1)] = ""
    echo: bool | None = None
    best_of: int | None = None
    suffix: Text | None = None

    def prompts(self) -> list[str | list[int]]:
        """One prompt per entry: a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)  # type: ignore[arg-type]


class Message(Strict):
    role: Annotated[str, Field(min_length=1, max_length=64)]
    content: Text
    name: Annotated[str, Field(max_length=64)] | None = None


class ChatRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    top_logprobs: Annotated[int, Field(ge=0)] | None = None
