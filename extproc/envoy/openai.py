"""OpenAI request bodies: parse once, find what admission needs, and rewrite what the upstream must see.

Admission needs the model, a token estimate of the prompt (text bytes, message count, exact token ids when
the client sent them), and the output budget (max_tokens × n × prompts in a batch). The upstream body is
rewritten only when needed: to inject the max_tokens the engine reserved for (when the client sent none),
and `stream_options.include_usage` so the stream ends with exact usage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

# path -> kind. Query strings and a trailing slash are ignored.
ENDPOINTS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "responses",
}
# Paths forwarded after authentication only (no admission, nothing to meter).
PASSTHROUGH = {"/v1/models"}

# Field that carries the output budget, per kind.
MAX_TOKENS_FIELDS = {
    "chat": ("max_completion_tokens", "max_tokens"),
    "completions": ("max_tokens",),
    "responses": ("max_output_tokens",),
    "embeddings": (),
}
INJECT_FIELD = {"chat": "max_tokens", "completions": "max_tokens", "responses": "max_output_tokens"}
# Deepest nesting accepted (the body object is level 1). orjson parses up to 1024 levels but serialises only up
# to 254, and we re-serialise bodies we rewrite: anything deeper is refused up front as invalid_json.
MAX_DEPTH = 128
# Image inputs cost tokens we cannot see from bytes; a fixed guess (a 336 px tile in LLaVA-style encoders).
IMAGE_TOKENS = 576


class BadRequest(ValueError):
    def __init__(self, message: str, code: str = "invalid_body") -> None:
        super().__init__(message)
        self.code = code


def endpoint_of(path: str) -> str:
    """Normalise `:path` to the endpoint path: no query string, no trailing slash."""
    path = path.split("?", 1)[0]
    if len(path) > 1 and path.endswith("/"):
        path = path.rstrip("/")
    return path


@dataclass(slots=True)
class OpenAIRequest:
    kind: str
    model: str
    body: dict[str, Any]
    stream: bool = False
    max_tokens: int | None = None  # per choice, as the client sent it
    fanout: int = 1  # choices produced = n × prompts in a batch
    text_bytes: int = 0  # UTF-8 bytes of prompt text
    segments: int = 0  # messages / prompts / inputs (per-segment template overhead)
    extra_tokens: int = 0  # tokens known without estimation (token-id prompts, images)
    exact: bool = False  # every prompt was given as token ids: extra_tokens is the exact count
    client_wants_usage: bool = False  # streaming client asked for stream_options.include_usage

    @property
    def output_budget(self) -> int | None:
        """max_tokens for the whole request (all choices), or None: let the engine apply a default."""
        if self.kind == "embeddings":
            return 0  # nothing is generated
        return None if self.max_tokens is None else self.max_tokens * self.fanout

    @property
    def injects_usage(self) -> bool:
        return self.stream and self.kind in ("chat", "completions") and not self.client_wants_usage


def _too_deep(raw: bytes, body: dict[str, Any]) -> bool:
    """Is any value nested deeper than MAX_DEPTH? Walks the document only when the raw bytes hold enough
    brackets for that to be possible (brackets inside strings count too, so this is only a pre-check)."""
    if raw.count(b"[") + raw.count(b"{") < MAX_DEPTH:
        return False
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        items = value.values() if isinstance(value, dict) else value
        stack.extend((v, depth + 1) for v in items if isinstance(v, (dict, list)))
    return False


def _text_len(value: Any) -> int:
    return len(value.encode("utf-8", "surrogatepass")) if isinstance(value, str) else 0


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _positive_int(body: dict[str, Any], name: str, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BadRequest(f"'{name}' must be a positive integer, got {value!r}.", "invalid_value")
    return value


def parse(kind: str, raw: bytes) -> OpenAIRequest:
    """Parse and check an OpenAI request body. Raises BadRequest with a message fit for the client."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"Request body is not valid JSON: {exc}", "invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("Request body must be a JSON object.", "invalid_json")
    if _too_deep(raw, body):
        raise BadRequest(f"Request body is nested more than {MAX_DEPTH} levels deep.", "invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required and must be a non-empty string.", "missing_model")
    req = OpenAIRequest(kind=kind, model=model, body=body)

    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean.", "invalid_value")
    req.stream = bool(stream)
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise BadRequest("'stream_options' must be an object.", "invalid_value")
    req.client_wants_usage = bool(opts and opts.get("include_usage") is True)

    for name in MAX_TOKENS_FIELDS[kind]:
        value = _positive_int(body, name, None)
        if value is not None:
            req.max_tokens = value
            break
    n = _positive_int(body, "n", 1) if kind in ("chat", "completions") else 1

    if kind == "chat":
        _chat_prompt(body, req)
    elif kind == "completions":
        _batch_prompt(body, "prompt", req)
    elif kind == "embeddings":
        _batch_prompt(body, "input", req)
    else:
        _responses_prompt(body, req)
    req.fanout = (n or 1) * (req.segments if kind == "completions" else 1)
    return req


def _chat_prompt(body: dict[str, Any], req: OpenAIRequest) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' is required and must be a non-empty array.", "invalid_messages")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise BadRequest(f"'messages[{i}]' must be an object.", "invalid_messages")
        req.segments += 1
        _content(msg.get("content"), req, f"messages[{i}].content")
        for key, value in msg.items():
            if key not in ("content", "role") and value is not None:
                req.text_bytes += len(orjson.dumps(value))  # tool_calls, name, ...: rendered into the prompt
    if body.get("tools"):
        req.text_bytes += len(orjson.dumps(body["tools"]))


def _content(content: Any, req: OpenAIRequest, where: str) -> None:
    if content is None or isinstance(content, str):
        req.text_bytes += _text_len(content)
        return
    if not isinstance(content, list):
        raise BadRequest(f"'{where}' must be a string or an array of parts.", "invalid_messages")
    for part in content:
        if not isinstance(part, dict):
            raise BadRequest(f"'{where}' parts must be objects.", "invalid_messages")
        ptype = part.get("type", "")
        if "text" in part:
            req.text_bytes += _text_len(part.get("text"))
        elif isinstance(ptype, str) and ("image" in ptype or "video" in ptype or "audio" in ptype):
            req.extra_tokens += IMAGE_TOKENS


def _batch_prompt(body: dict[str, Any], field: str, req: OpenAIRequest) -> None:
    value = body.get(field)
    if isinstance(value, str):
        req.segments, req.text_bytes = 1, _text_len(value)
        return
    if _is_token_ids(value):
        req.segments, req.extra_tokens, req.exact = 1, len(value), True
        return
    if isinstance(value, list) and value:
        exact = True
        for item in value:
            if isinstance(item, str):
                req.text_bytes += _text_len(item)
                exact = False
            elif _is_token_ids(item):
                req.extra_tokens += len(item)
            else:
                raise BadRequest(f"'{field}' items must be strings or arrays of token ids.", "invalid_prompt")
            req.segments += 1
        req.exact = exact
        return
    raise BadRequest(f"'{field}' is required: a string, an array of strings, or token ids.", "invalid_prompt")


def _responses_prompt(body: dict[str, Any], req: OpenAIRequest) -> None:
    value = body.get("input")
    if isinstance(value, str):
        req.segments, req.text_bytes = 1, _text_len(value)
    elif isinstance(value, list) and value:
        for i, item in enumerate(value):
            req.segments += 1
            if isinstance(item, str):
                req.text_bytes += _text_len(item)
            elif isinstance(item, dict):
                if "content" in item:
                    _content(item.get("content"), req, f"input[{i}].content")
                else:
                    req.text_bytes += len(orjson.dumps(item))
            else:
                raise BadRequest(f"'input[{i}]' must be a string or an object.", "invalid_prompt")
    else:
        raise BadRequest("'input' is required: a string or an array of items.", "invalid_prompt")
    if isinstance(body.get("instructions"), str):
        req.segments += 1
        req.text_bytes += _text_len(body["instructions"])


def upstream_body(req: OpenAIRequest, reserved_max_tokens: int) -> bytes | None:
    """The body to send upstream, or None when the client's bytes can go unchanged.

    `reserved_max_tokens` is what the engine reserved for the whole request; when the client sent no
    max_tokens we inject the per-choice share so the backend cannot generate more than was reserved.
    """
    changes: dict[str, Any] = {}
    if req.max_tokens is None and req.kind in INJECT_FIELD and reserved_max_tokens > 0:
        changes[INJECT_FIELD[req.kind]] = max(1, reserved_max_tokens // max(1, req.fanout))
    if req.injects_usage:
        opts = dict(req.body.get("stream_options") or {})
        opts["include_usage"] = True
        changes["stream_options"] = opts
    if not changes:
        return None
    return orjson.dumps({**req.body, **changes})
