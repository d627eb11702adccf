"""The OpenAI chat-completions surface: request checks, error bodies and response objects.

Fields that would change what an answer means but that we do not do (tools, n > 1, logprobs,
penalties, stop strings, JSON mode) are refused with a 400 naming them, never ignored.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from epic_rag.app.answering import AnswerReport, ChatRequest
from llama_index.core.base.llms.types import ChatMessage, MessageRole

from epic_rag import parse_policy

MAX_TOP_K = 32
REFUSED_FIELDS = {
    "tools": "tool calls are not supported",
    "tool_choice": "tool calls are not supported",
    "functions": "function calls are not supported",
    "function_call": "function calls are not supported",
    "logit_bias": "logit_bias is not supported",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
}


class APIError(Exception):
    """An error answered as OpenAI does: a status and {"error": {message, type, param, code}}."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or {401: "authentication_error", 404: "invalid_request_error", 503: "server_error"}.get(
            status, "invalid_request_error"
        )

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    model_id: str
    max_question_tokens: int
    window: int  # the model's context length
    max_tokens: int  # the most answer tokens one request may ask for


def parse_chat_request(body: Any, limits: Limits, count_tokens) -> tuple[ChatRequest, bool]:
    """(the request, whether to stream) from a JSON body, or an APIError naming what is wrong."""
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    model = body.get("model")
    if not model:
        raise APIError(400, "'model' is required", param="model")
    if model != limits.model_id:
        raise APIError(
            404, f"the model {model!r} does not exist; this server has {limits.model_id!r}", "model", "model_not_found"
        )
    for name, why in REFUSED_FIELDS.items():
        if body.get(name) not in (None, [], {}):
            raise APIError(400, f"{why} by this server: remove {name!r}", param=name, code="unsupported_parameter")
    _refuse_semantics(body)
    system, turns = _messages(body.get("messages"))
    question = turns[-1].content or ""
    n = count_tokens(question)
    max_tokens = (
        _int(body, "max_completion_tokens", None) or _int(body, "max_tokens", None) or min(256, limits.max_tokens)
    )
    if not 1 <= max_tokens <= limits.max_tokens:
        raise APIError(400, f"max_tokens must be between 1 and {limits.max_tokens}, got {max_tokens}", "max_tokens")
    if n + max_tokens > limits.window:
        raise APIError(
            400,
            f"the question is {n} tokens and {max_tokens} are asked for the answer; the model's context is "
            f"{limits.window} tokens: shorten the question or lower max_tokens",
            "messages",
            "context_length_exceeded",
        )
    if n > limits.max_question_tokens:
        raise APIError(
            400,
            f"the question is {n} tokens, over this server's limit of {limits.max_question_tokens}: shorten it",
            "messages",
            "context_length_exceeded",
        )
    policy = body.get("policy")
    if policy is not None:
        try:
            policy = parse_policy(str(policy)).spec
        except ValueError as err:
            raise APIError(400, f"unknown policy: {err}", "policy", "invalid_policy") from None
    top_k = _int(body, "top_k", None)
    if top_k is not None and not 1 <= top_k <= MAX_TOP_K:
        raise APIError(400, f"top_k must be between 1 and {MAX_TOP_K}, got {top_k}", "top_k")
    temperature = _number(body, "temperature", 0.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 1e-6, 1.0)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false", "stream")
    request = ChatRequest(
        question=question,
        history=turns[:-1],
        system=system,
        policy=policy,
        top_k=top_k,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=_int(body, "seed", None),
    )
    return request, stream


def _refuse_semantics(body: dict) -> None:
    if body.get("n", 1) != 1:
        raise APIError(400, "only n = 1 is supported: ask again for another answer", "n", "unsupported_parameter")
    if body.get("stop"):
        raise APIError(
            400, "stop sequences are not supported by this server: remove 'stop'", "stop", "unsupported_parameter"
        )
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise APIError(400, f"{name} is not supported: remove it or send 0", name, "unsupported_parameter")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise APIError(400, "logprobs are not supported by this server", "logprobs", "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt not in (None, {}) and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise APIError(400, "only the text response format is supported", "response_format", "unsupported_parameter")


def _messages(raw: Any) -> tuple[str | None, list[ChatMessage]]:
    """(the client's system text, user/assistant turns ending with the user's question)."""
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    system, turns = [], []
    for i, message in enumerate(raw):
        if not isinstance(message, dict) or "role" not in message:
            raise APIError(400, f"messages[{i}] must be an object with 'role' and 'content'", "messages")
        role, content = message["role"], _text(message.get("content"), i)
        if role in ("system", "developer"):
            system.append(content)
        elif role in ("user", "assistant"):
            turns.append(ChatMessage(role=MessageRole(role), content=content))
        else:
            raise APIError(400, f"messages[{i}] has role {role!r}; use system, user or assistant", "messages")
    if not turns or turns[-1].role != MessageRole.USER or not (turns[-1].content or "").strip():
        raise APIError(400, "the last message must be the user's question, and not empty", "messages")
    return "\n".join(s for s in system if s.strip()) or None, turns


def _text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise APIError(400, f"messages[{i}].content must be text (a string or text parts)", "messages")


def _int(body: dict, name: str, default: int | None) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"{name!r} must be an integer, got {value!r}", name)
    return value


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise APIError(400, f"{name!r} must be a number from {low:g} to {high:g}, got {value!r}", name)
    return float(value)


class Completion:
    """The response objects of one completion, streamed or whole."""

    def __init__(self, model_id: str) -> None:
        self.id, self.created, self.model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model_id

    def _base(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**self._base("chat.completion.chunk"), "choices": [choice]}

    def last_chunk(self, report: AnswerReport) -> dict[str, Any]:
        return {**self.chunk({}, report.finish_reason), "usage": usage(report), "epic_rag": report.extension()}

    def whole(self, report: AnswerReport) -> dict[str, Any]:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": report.text},
            "logprobs": None,
            "finish_reason": report.finish_reason,
        }
        return {
            **self._base("chat.completion"),
            "choices": [choice],
            "usage": usage(report),
            "epic_rag": report.extension(),
        }


def usage(report: AnswerReport) -> dict[str, int]:
    return {
        "prompt_tokens": report.tokens_prompt,
        "completion_tokens": report.tokens_generated,
        "total_tokens": report.tokens_prompt + report.tokens_generated,
    }
