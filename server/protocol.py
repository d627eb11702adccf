"""The OpenAI chat-completions schemas as pydantic models: the request, the responses, the errors.

A request is validated here, field by field: a malformed one becomes a 400 whose OpenAI-style
error body names the field (`APIError.from_validation`). Fields that would change what an
answer means but that we do not do (tools, n > 1, logprobs, penalties, stop strings, JSON
mode) are refused with a 400 naming them, never ignored; fields we do not know are ignored,
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


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions: OpenAI's fields, plus `policy` and `top_k` of our own."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    messages: list[ChatMessageParam]
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stream: bool = False
    policy: str | None = None  # a recompute policy spec for this request (default: the server's)
    top_k: int | None = Field(default=None, ge=1, le=MAX_TOP_K)  # chunks to retrieve (default: the server's)
    # accepted only with the values that change nothing:
    n: int | None = None
    stop: Any = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
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

    @field_validator("stop")
    @classmethod
    def _no_stop(cls, stop: Any) -> Any:
        if stop:
            raise PydanticCustomError(UNSUPPORTED, "stop sequences are not supported by this server: remove 'stop'")
        return stop

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value not in (None, 0.0):
            raise PydanticCustomError(UNSUPPORTED, f"{info.field_name} is not supported: remove it or send 0")
        return value

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


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


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


class ChatCompletionStreamResponse(BaseModel):
    """One server-sent event of a streamed answer; only the last carries `usage` and `epic_rag`."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None
    epic_rag: dict[str, Any] | None = None

    @model_serializer(mode="wrap")
    def _last_chunk_extras(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        fields = handler(self)
        for name in ("usage", "epic_rag"):
            if fields[name] is None:
                del fields[name]
        return fields


class HealthResponse(BaseModel):
    """GET /health: for load balancers and operators."""

    status: Literal["ok"] = "ok"
    model: str
    queue_depth: int
    kv_tiers: dict[str, Literal["up", "down"]]
    index_generation: int  # moves on with every build or update of the index; the server follows it
