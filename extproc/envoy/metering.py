"""Counting what the backend returns: JSON `usage`, or SSE chunks and the final usage chunk.

SSE: events are split on blank lines; each `data:` payload is parsed once. Output tokens are counted as
chunks pass (one per choice whose delta carries content, reasoning or tool calls: vLLM emits one chunk per
decode step), so the engine can follow KV growth; the final `usage` (exact) replaces the count at the end.

When we injected `stream_options.include_usage` for a client that did not ask, the usage-only chunk
(`"choices": []` with a usage object) is dropped, and a `"usage": null` field on other chunks (OpenAI adds
one when include_usage is on) is removed, so the client receives exactly the stream it asked for.
"""

from __future__ import annotations

from typing import Any

import orjson

_DELIMS = (b"\r\n\r\n", b"\n\n")


def usage_tokens(usage: Any) -> tuple[int | None, int | None]:
    """(input, output) tokens from an OpenAI usage object (chat/completions/embeddings/responses shapes)."""
    if not isinstance(usage, dict):
        return None, None
    inp = usage.get("prompt_tokens", usage.get("input_tokens"))
    out = usage.get("completion_tokens", usage.get("output_tokens"))
    inp = inp if isinstance(inp, int) and not isinstance(inp, bool) and inp >= 0 else None
    out = out if isinstance(out, int) and not isinstance(out, bool) and out >= 0 else None
    if out is None and inp is not None and "total_tokens" in usage:
        out = 0  # embeddings: prompt_tokens + total_tokens, nothing generated
    return inp, out


class ResponseMeter:
    """Meters one response body. `feed` returns the bytes to pass on to the client (possibly fewer)."""

    def __init__(self, kind: str, sse: bool, strip_usage: bool, json_cap: int = 32 << 20) -> None:
        self.kind = kind
        self.sse = sse
        self.strip_usage = strip_usage and sse
        self.output_tokens = 0  # counted from chunks
        self.usage: dict[str, Any] | None = None
        self.error: Any = None  # an error object the backend put in the body/stream
        self.dropped_events = 0
        self._buf = bytearray()
        self._json_cap = json_cap
        self._json_overflow = False

    # ---- results -------------------------------------------------------------------------------------------
    @property
    def input_tokens(self) -> int | None:
        return usage_tokens(self.usage)[0]

    @property
    def final_output_tokens(self) -> int:
        out = usage_tokens(self.usage)[1]
        return out if out is not None else self.output_tokens

    # ---- feeding ---------------------------------------------------------------------------------------------
    def feed(self, data: bytes) -> bytes:
        if not self.sse:
            if not self._json_overflow:
                if len(self._buf) + len(data) > self._json_cap:
                    self._json_overflow = True  # too big to parse for usage: fall back to the reservation
                    self._buf.clear()
                else:
                    self._buf += data
            return data
        self._buf += data
        out = bytearray()
        while True:
            cut, dlen = -1, 0
            for d in _DELIMS:
                i = self._buf.find(d)
                if i != -1 and (cut == -1 or i < cut):
                    cut, dlen = i, len(d)
            if cut == -1:
                break
            event = bytes(self._buf[: cut + dlen])
            del self._buf[: cut + dlen]
            out += self._event(event)
        # Nothing to drop: the client gets the bytes as they came (partial events too, for latency).
        return bytes(out) if self.strip_usage else data

    def finish(self) -> bytes:
        """End of body: parse what is left. Returns the bytes still owed to the client."""
        if not self.sse:
            if self._buf and not self._json_overflow:
                try:
                    obj = orjson.loads(self._buf)
                except orjson.JSONDecodeError:
                    obj = None
                if isinstance(obj, dict):
                    if isinstance(obj.get("usage"), dict):
                        self.usage = obj["usage"]
                    if obj.get("error") is not None:
                        self.error = obj["error"]
                    self.output_tokens = self._count(obj)
            self._buf.clear()
            return b""
        rest = bytes(self._buf)
        self._buf.clear()
        out = self._event(rest) if rest.strip() else rest
        return out if self.strip_usage else b""

    # ---- internals -------------------------------------------------------------------------------------------
    def _event(self, event: bytes) -> bytes:
        """Meter one complete SSE event; return what a usage-stripped stream should carry for it."""
        data_lines = [ln[5:].lstrip(b" ") for ln in event.splitlines() if ln.startswith(b"data:")]
        payload = b"\n".join(data_lines).strip()
        if not payload.startswith(b"{"):
            return event  # [DONE], comments, keep-alives
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return event
        if not isinstance(obj, dict):
            return event
        self.output_tokens += self._count(obj)
        usage = obj.get("usage")
        if usage is None and isinstance(obj.get("response"), dict):  # Responses API: response.completed
            usage = obj["response"].get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        if obj.get("error") is not None:
            self.error = obj["error"]
        if not self.strip_usage:
            return event
        if obj.get("choices") == [] and isinstance(obj.get("usage"), dict):
            self.dropped_events += 1
            return b""
        if "usage" in obj and obj["usage"] is None:
            del obj["usage"]
            other = [ln for ln in event.splitlines() if ln and not ln.startswith(b"data:")]
            head = b"\n".join(other) + b"\n" if other else b""
            return head + b"data: " + orjson.dumps(obj) + b"\n\n"
        return event

    def _count(self, obj: dict[str, Any]) -> int:
        etype = obj.get("type")
        if isinstance(etype, str):  # Responses API stream events
            return 1 if etype.endswith(".delta") and "output" in etype else 0
        choices = obj.get("choices")
        if not isinstance(choices, list):
            return 0
        n = 0
        for c in choices:
            if not isinstance(c, dict):
                continue
            delta = c.get("delta")
            if isinstance(delta, dict):
                if delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning") or delta.get(
                    "tool_calls"
                ):
                    n += 1
            elif c.get("text"):
                n += 1
            elif isinstance(c.get("message"), dict) and c["message"].get("content"):
                n += 1  # non-streaming without usage: we only know that something came back
        return n
