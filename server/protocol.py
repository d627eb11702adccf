"""The OpenAI chat-completions and completions schemas as pydantic models: requests, responses, errors.

A request is validated here, field by field: a malformed one becomes a 400 whose OpenAI-style
error body names the field (`APIError.from_validation`). Fields that would change what an
answer means but that we do not do (tools, n > 1, logprobs, penalties, echo, JSON mode) are
refused with a 400 naming them, never ignored; fields we do not know are ignored,
as OpenAI's own server does with ones newer clients add. What needs the loaded model (the
model id, token limits) is checked by `serving_chat`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
)
from pydantic_core import PydanticCustomError

MAX_TOP_K = 32
MAX_STOP = 4  # stop sequences per request, as OpenAI allows
ROLES = ("system", "developer", "user", "assistant")
REFUSED_FIELDS = {
    "tools": "tool calls are not supported",
    "tool_choice": "tool calls are not supported",
    "functions": "function calls are not supported",
    "function_call": "function calls are not supported",
    "logit_bias": "logit_bias is not supported",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
}
UNSUPPORTED = "unsupported_parameter"
INVALID_POLICY = "invalid_policy"
_CODES = {UNSUPPORTED, INVALID_POLICY}  # our own validation error types, sent as the error's `code`
_KINDS = {401: "authentication_error", 404: "invalid_request_error", 503: "server_error"}


class APIError(Exception):
    """An error answered as OpenAI does: a status and {"error": {message, type, param, code}}."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or _KINDS.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        """The JSON body of this error."""
        return ErrorResponse(
            error=ErrorInfo(message=self.message, type=self.kind, param=self.param, code=self.code)
        ).model_dump()

    @classmethod
    def from_validation(cls, err: ValidationError) -> APIError:
        """A 400 for a request pydantic refused, naming its first wrong field (`messages[2].role`)."""
        first = err.errors(include_url=False)[0]
        if first["type"] == "json_invalid":
            return cls(400, "the body is not valid JSON")
        if not first["loc"]:
            return cls(400, "the body must be a JSON object")
        param = _path(first["loc"])
        code = first["type"] if first["type"] in _CODES else None
        return cls(400, f"{param}: {first['msg']}", param=param, code=code)


def _path(loc: tuple[str | int, ...]) -> str:
    """('messages', 2, 'role') -> 'messages[2].role'."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


class ChatMessageParam(BaseModel):
    """One message of a request: a role and text (a string, or a list of text parts)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    role: str
    content: str

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role not in ROLES:
            raise PydanticCustomError("invalid_role", f"role {role!r} is not one of {', '.join(ROLES)}")
        return role

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, content: Any) -> str:
        if isinstance(content, str):
            return content
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            return "".join(str(p.get("text", "")) for p in content)
        raise PydanticCustomError("invalid_content", "must be text (a string or text parts)")


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool = False  # a last chunk with empty `choices` carries the usage


class EpicRagOptions(BaseModel):
    """The request's `epic_rag` object: our own switches."""

    model_config = ConfigDict(strict=True, extra="ignore")

    retrieval: bool = True  # False: plain chat with the model, no documents (titles, tags, small talk)


class GenerationRequest(BaseModel):
    """What chat completions and completions share: the model, sampling, stop strings, streaming,
    and our own `policy`, `top_k` and `epic_rag` fields."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    min_tokens: int = Field(default=0, ge=0)  # vLLM's extension: no end token before this many
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: list[str] = Field(default_factory=list)  # up to 4; a single string is one
    policy: str | None = None  # a recompute policy spec for this request (default: the server's)
    top_k: int | None = Field(default=None, ge=1, le=MAX_TOP_K)  # chunks to retrieve (default: the server's)
    epic_rag: EpicRagOptions = Field(default_factory=EpicRagOptions)
    # accepted only with the values that change nothing:
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, stop: Any) -> list[str]:
        stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise PydanticCustomError("invalid_stop", "must be a non-empty string or a list of non-empty strings")
        if len(stops) > MAX_STOP:
            raise PydanticCustomError("invalid_stop", f"at most {MAX_STOP} stop sequences, got {len(stops)}")
        return stops

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, policy: str | None) -> str | None:
        from epic_rag import parse_policy

        try:
            return parse_policy(policy).spec if policy is not None else None
        except ValueError as err:
            raise PydanticCustomError(INVALID_POLICY, str(err)) from None

    @field_validator("n")
    @classmethod
    def _one_answer(cls, n: int | None) -> int | None:
        if n not in (None, 1):
            raise PydanticCustomError(UNSUPPORTED, "only n = 1 is supported: ask again for another answer")
        return n

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value not in (None, 0.0):
            raise PydanticCustomError(UNSUPPORTED, f"{info.field_name} is not supported: remove it or send 0")
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def answer_tokens(self) -> tuple[str, int | None]:
        """(the field that asks for the answer's length, its value)."""
        return "max_tokens", self.max_tokens


class ChatCompletionRequest(GenerationRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessageParam]
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: Any = None
    # refused whatever their value (an empty list or object aside):
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    logit_bias: Any = None
    audio: Any = None
    prediction: Any = None

    @field_validator("messages")
    @classmethod
    def _ends_with_a_question(cls, messages: list[ChatMessageParam]) -> list[ChatMessageParam]:
        if not messages:
            raise PydanticCustomError("invalid_messages", "must be a non-empty list of {role, content} objects")
        turns = [m for m in messages if m.role in ("user", "assistant")]
        if not turns or turns[-1].role != "user" or not turns[-1].content.strip():
            raise PydanticCustomError("invalid_messages", "the last message must be the user's question, and not empty")
        return messages

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def _no_logprobs(cls, value: Any) -> Any:
        if value:
            raise PydanticCustomError(UNSUPPORTED, "logprobs are not supported by this server")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_format(cls, fmt: Any) -> Any:
        if fmt not in (None, {}) and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
            raise PydanticCustomError(UNSUPPORTED, "only the text response format is supported")
        return fmt

    @field_validator(*REFUSED_FIELDS)
    @classmethod
    def _refused(cls, value: Any, info: ValidationInfo) -> Any:
        if value not in (None, [], {}):
            raise PydanticCustomError(UNSUPPORTED, f"{REFUSED_FIELDS[info.field_name]} by this server: remove it")
        return value

    @property
    def answer_tokens(self) -> tuple[str, int | None]:
        """(the field that asks for the answer's length, its value): max_completion_tokens wins."""
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens


class CompletionRequest(GenerationRequest):
    """POST /v1/completions: one prompt (with retrieval, the question; without, text to continue)."""

    prompt: str
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> str:
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt.strip():
            raise PydanticCustomError(
                "invalid_prompt", "must be one non-empty string (token ids and batches are not supported)"
            )
        return prompt

    @field_validator("echo", "suffix", "logprobs")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        if value not in (None, False, ""):
            raise PydanticCustomError(UNSUPPORTED, f"{info.field_name} is not supported by this server: remove it")
        return value

    @field_validator("best_of")
    @classmethod
    def _one_candidate(cls, best_of: int | None) -> int | None:
        if best_of not in (None, 1):
            raise PydanticCustomError(UNSUPPORTED, "only best_of = 1 is supported")
        return best_of


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "epic-rag"


class ModelList(BaseModel):
    """GET /v1/models: one model, the index this server answers from."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose KV came from the store instead of being computed


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str  # "stop", "length" or "cancelled"


class ChatCompletionResponse(BaseModel):
    """A whole answer; `epic_rag` is our extension (sources, TTFT, tokens reused), which clients ignore."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    epic_rag: dict[str, Any]


class DeltaMessage(BaseModel):
    """What one streamed chunk adds; fields it does not carry are left out, as OpenAI does."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _set_fields_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionStreamChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: str | None = None


class StreamChunk(BaseModel):
    """What every streamed event shares: the finishing chunk carries `epic_rag`, and with
    `stream_options.include_usage` a last chunk with empty `choices` carries `usage`."""

    id: str
    created: int
    model: str
    usage: UsageInfo | None = None
    epic_rag: dict[str, Any] | None = None

    @model_serializer(mode="wrap")
    def _extras_when_set(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        fields = handler(self)
        for name in ("usage", "epic_rag"):
            if fields[name] is None:
                del fields[name]
        return fields


class ChatCompletionStreamResponse(StreamChunk):
    """One server-sent event of a streamed chat answer."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatCompletionStreamChoice]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """A whole completion (POST /v1/completions)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    epic_rag: dict[str, Any]


class CompletionStreamResponse(StreamChunk):
    """One server-sent event of a streamed completion (the same object as a whole one, as OpenAI sends)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class HealthResponse(BaseModel):
    """GET /health: for load balancers and operators."""

    status: Literal["ok"] = "ok"
    model: str
    queue_depth: int
    kv_tiers: dict[str, Literal["up", "down"]]
    index_generation: int  # moves on with every build or update of the index; the server follows it
