"""SSE chunk bytes for streamed completions, in vLLM's shapes.

Chunks are assembled from pre-serialized pieces instead of dicts + a JSON encoder per token: the
server is CPU-bound on chunks per second, and filler text never needs JSON escaping.
"""

from __future__ import annotations

import orjson

from extproc.sim.tokens import FILLER

_FILLER_B = tuple(w.encode() for w in FILLER)
DONE = b"data: [DONE]\n\n"


def filler_bytes(start: int, end: int) -> bytes:
    n = len(_FILLER_B)
    return b"".join(_FILLER_B[i % n] for i in range(start, end))


class ChunkEncoder:
    """The chunks of one streamed response (chat.completion.chunk or text_completion)."""

    __slots__ = ("_head", "_open", "_close", "_last")

    def __init__(self, request_id: str, created: int, model: str, chat: bool) -> None:
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = orjson.dumps({"id": request_id, "object": obj, "created": created, "model": model})[:-1]
        self._head = b"data: " + head + b',"choices":'
        if chat:
            self._open = self._head + b'[{"index":0,"delta":{"content":"'
            self._close = b'"},"logprobs":null,"finish_reason":null}]}\n\n'
            self._last = b'"},"logprobs":null,"finish_reason":"length","stop_reason":null}]}\n\n'
        else:
            self._open = self._head + b'[{"index":0,"text":"'
            self._close = b'","logprobs":null,"finish_reason":null}]}\n\n'
            self._last = b'","logprobs":null,"finish_reason":"length","stop_reason":null}]}\n\n'

    def role(self) -> bytes:
        """vLLM's first chat chunk: the assistant role with empty content."""
        return self._head + b'[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,' \
                            b'"finish_reason":null}]}\n\n'

    def tokens(self, start: int, end: int, last: bool) -> bytes:
        """One chunk carrying output tokens [start, end); the last one has finish_reason "length"."""
        return self._open + filler_bytes(start, end) + (self._last if last else self._close)

    def usage(self, usage: dict[str, int]) -> bytes:
        """The include_usage chunk: no choices, the request's usage."""
        return self._head + b"[],\"usage\":" + orjson.dumps(usage) + b"}\n\n"
