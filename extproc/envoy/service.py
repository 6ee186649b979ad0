"""The ext_proc servicer: one gRPC stream per HTTP request, driven by the engine's decisions.

Envoy runs both bodies in FULL_DUPLEX_STREAMED mode (see envoy/bootstrap.yaml). That gives us:
- no per-message timer at all, so a queued request is held simply by not answering yet, for as long as its
  queue deadline says (the engine's tick turns an expired wait into a 429);
- no Envoy-side buffering of the prompt (no 1 MiB limit): chunks come to us as they arrive, we keep the
  body, decide, and send it back upstream ourselves (≤ 64 KiB per message);
- the response stream passes through us chunk by chunk, so we can meter SSE and drop the usage-only chunk.

The life of one exchange:
  request headers  → authenticate, check path/method/size, wait for the body
  request body     → (end of stream) parse, estimate tokens, engine.admit
        ADMIT      → answer headers (+ identity headers for the upstream) and the (rewritten) body
        QUEUE      → hold; Gateway.dispatch delivers `admitted` / `rejected` from engine events
        REJECT     → ImmediateResponse (OpenAI error JSON, Retry-After, RateLimit headers)
  response headers → RateLimit headers to the client; a non-2xx upstream status releases the reservation
  response body    → meter (progress), strip usage chunk if we injected it; at end engine.finish
  stream ends early (client abort, upstream reset, eviction) → finally: release exactly once

Reservations are settled exactly once per request: `Exchange.settled` guards finish/release, and the
engine's own calls are idempotent as a second line of defence.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

import grpc
import structlog
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2

from ..config import Config
from ..config.documents import ServiceClass
from ..engine.decisions import Decision, Events, Reason, Verdict
from ..telemetry import Recorder
from ..telemetry import logs as tlogs
from ..telemetry.recorder import NONE
from . import errors
from .errors import Reply
from .identity import KeyMap, TrustedSource, bearer_key, trusted_entitlement
from .metering import ResponseMeter
from .openai import ENDPOINTS, PASSTHROUGH, BadRequest, OpenAIRequest, endpoint_of, parse, upstream_body
from .tokens import Estimate, TokenEstimator

log = structlog.get_logger("tokenpools.envoy")

HEADER_PREFIX = "x-tokenpools-"
CHUNK = 64 * 1024  # StreamedBodyResponse size recommended by Envoy for FULL_DUPLEX_STREAMED
DEFAULT_MAX_BODY = 16 * 1024 * 1024
# An oversized body is read and dropped up to this multiple of the limit before the 413, beyond it cut short.
DRAIN_FACTOR = 4
# A queued request whose engine deadline passed without an event is answered by us after this grace.
QUEUE_GRACE_S = 1.0
_OVERWRITE = base_pb2.HeaderValueOption.HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD


# ---- protobuf helpers -----------------------------------------------------------------------------------------
def _mutation(set_headers: dict[str, str] | None = None, remove: Iterable[str] = ()) -> pb.HeaderMutation:
    m = pb.HeaderMutation()
    for k, v in (set_headers or {}).items():
        m.set_headers.append(
            base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, raw_value=v.encode()), append_action=_OVERWRITE)
        )
    m.remove_headers.extend(remove)
    return m


def _immediate(reply: Reply) -> pb.ProcessingResponse:
    headers = {"content-type": "application/json", **reply.headers}
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=reply.status),
            headers=_mutation(headers),
            body=reply.body(),
            details=reply.details,
        )
    )


def _headers_response(direction: str, mutation: pb.HeaderMutation | None = None) -> pb.ProcessingResponse:
    common = pb.CommonResponse(header_mutation=mutation) if mutation is not None else pb.CommonResponse()
    return pb.ProcessingResponse(**{direction: pb.HeadersResponse(response=common)})


def _body_response(direction: str, body: bytes, end_of_stream: bool) -> pb.ProcessingResponse:
    return pb.ProcessingResponse(
        **{
            direction: pb.BodyResponse(
                response=pb.CommonResponse(
                    body_mutation=pb.BodyMutation(
                        streamed_response=pb.StreamedBodyResponse(body=body, end_of_stream=end_of_stream)
                    )
                )
            )
        }
    )


def _body_responses(direction: str, body: bytes, end_of_stream: bool) -> list[pb.ProcessingResponse]:
    if not body:
        return [_body_response(direction, b"", end_of_stream)] if end_of_stream else []
    out = []
    for i in range(0, len(body), CHUNK):
        piece = body[i : i + CHUNK]
        out.append(_body_response(direction, piece, end_of_stream and i + CHUNK >= len(body)))
    return out


def _trailers_response(direction: str) -> pb.ProcessingResponse:
    return pb.ProcessingResponse(**{direction: pb.TrailersResponse()})


def _header_map(headers: pb.HttpHeaders) -> dict[str, str]:
    out: dict[str, str] = {}
    for hv in headers.headers.headers:
        value = hv.raw_value.decode("utf-8", "replace") if hv.raw_value else hv.value
        key = hv.key.lower()
        out[key] = f"{out[key]},{value}" if key in out else value
    return out


# Query parameters clients use for API keys (OpenAI-compatible servers, Azure, Google): never passed upstream.
_KEY_PARAMS = frozenset({"api_key", "api-key", "apikey", "key", "access_token", "token"})


def _without_key_params(path: str) -> str:
    base, _, query = path.partition("?")
    kept = [p for p in query.split("&") if p and p.split("=", 1)[0].lower() not in _KEY_PARAMS]
    return f"{base}?{'&'.join(kept)}" if kept else base


def _metadata(req: pb.ProcessingRequest) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for ns, struct in req.metadata_context.filter_metadata.items():
        out[ns] = {k: (v.string_value if v.HasField("string_value") else None) for k, v in struct.fields.items()}
    return out


# ---- the shared side: engine, keys, live exchanges ---------------------------------------------------------------
@dataclass
class AdapterStats:
    streams: int = 0
    admitted: int = 0
    queued: int = 0
    refusals: Counter = field(default_factory=Counter)  # ImmediateResponses, by "status:code"
    finished: int = 0
    released: int = 0
    evicted: int = 0
    dropped_usage_chunks: int = 0  # usage-only SSE chunks we asked for and kept from the client
    exact_usage: int = 0  # finished with the backend's own usage numbers (else: counted chunks)
    input_tokens: int = 0  # reconciled totals passed to engine.finish
    output_tokens: int = 0
    shadow: Counter = field(default_factory=Counter)  # shadow mode: admitted anyway, by "would:reason"


class Gateway:
    """What all streams share: the engine, the key map, the token estimator, and who is waiting on what."""

    def __init__(
        self,
        engine: Any,
        config: Config,
        clock: Callable[[], float] = time.time,
        max_body_bytes: int = DEFAULT_MAX_BODY,
        trusted: TrustedSource | None = None,
        estimator: TokenEstimator | None = None,
        telemetry: Recorder | None = None,
    ) -> None:
        self.engine = engine
        self.config = config
        self.clock = clock
        self.max_body_bytes = max_body_bytes
        self.trusted = trusted
        self.keys = KeyMap.from_config(config)
        self.estimator = estimator or TokenEstimator()
        self.live: dict[str, Exchange] = {}  # request id -> exchange (registered from admit to settle)
        self.open_streams = 0  # ext_proc streams being served now (a draining server waits for 0)
        self.in_flight: Counter[str] = Counter()  # admitted and not yet settled, per entitlement
        self.stats = AdapterStats()
        self.telemetry = telemetry if telemetry is not None else Recorder()  # metrics: extproc/telemetry

    # Engine events: queued requests admitted or given up, in-flight ones evicted.
    def dispatch(self, events: Events | None) -> None:
        if not events:
            return
        for rid in events.admitted:
            ex = self.live.get(rid)
            if ex is None:
                # Nobody waits for it any more (the stream ended in between): give the capacity back.
                self.dispatch(self.engine.release(rid, self.clock()))
            else:
                ex.signal(("admitted", None))
        for decision in events.rejected:
            ex = self.live.get(decision.request_id)
            if ex is not None:
                ex.signal(("rejected", decision))
        self.evict(events.evicted)

    def evict(self, request_ids: Iterable[str]) -> None:
        """The engine already released these reservations: mark them settled now (so nothing is released
        twice, whatever the stream does next) and let each stream end its request."""
        for rid in request_ids:
            ex = self.live.get(rid)
            if ex is not None:
                ex.evicted = True
                ex.settled = True
                ex.unregister()
                ex.signal(("evict", None))

    def tick(self) -> None:
        self.dispatch(self.engine.tick(self.clock()))

    def concurrency_limit(self, entitlement: str) -> int | None:
        """The entitlement's concurrency ceiling as the RateLimit headers state it (the engine's own)."""
        return self.engine.concurrency_ceiling(entitlement)

    def ratelimit(self, entitlement: str) -> dict[str, str]:
        limit = self.concurrency_limit(entitlement)
        if limit is None:
            return {}
        return errors.ratelimit_headers(limit, limit - self.in_flight[entitlement], 0)


# ---- one HTTP request ------------------------------------------------------------------------------------------
class Exchange:
    """State of one HTTP request as seen through its ext_proc stream. Handlers return the messages to send."""

    def __init__(self, gw: Gateway, inbox: asyncio.Queue) -> None:
        self.gw = gw
        self.inbox = inbox
        self.state = "request_headers"
        self.echo = False  # pass-through endpoints: no admission, no metering
        self.done = False
        self.rid: str | None = None
        self.entitlement: str | None = None
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.received = 0
        self.too_large: int | None = None
        self.trailers_pending = False
        self.req: OpenAIRequest | None = None
        self.estimate: Estimate | None = None
        self.decision: Decision | None = None
        self.admitted = False
        self.settled = False
        self.evicted = False
        self.meter: ResponseMeter | None = None
        self.upstream_error = False
        self.sent_response_headers = False
        self.progress_sent = 0
        self.req_kind = ""
        self.preemptible = False  # admitted preemptible work may be evicted: its stream listens for that
        self.who: tuple[str, str] | None = None  # (class, entitlement label) for metrics, set at the decision
        self.queued_at = 0.0
        self._expiry: asyncio.TimerHandle | None = None

    # -- plumbing --
    def signal(self, item: tuple[str, Any]) -> None:
        self.inbox.put_nowait(item)

    def _reply(self, reply: Reply) -> list[pb.ProcessingResponse]:
        self.done = True
        self.gw.stats.refusals[f"{reply.status}:{reply.code}"] += 1
        log.debug("reply", status=reply.status, code=reply.code, rid=self.rid, entitlement=self.entitlement)
        return [_immediate(reply)]

    def _refusal(self, reason: Reason | None, retry_after: float | None) -> Reply:
        """The reply to an engine refusal (reject, queue give-up, eviction), logged once at info."""
        reply = errors.for_reason(reason, retry_after, self.gw.concurrency_limit(self.entitlement))
        secs = reply.headers.get("retry-after")  # what the client is told, whole seconds
        log.info("rejected", rid=self.rid, entitlement=self.entitlement, reason=reply.code, status=reply.status,
                 retry_after=int(secs) if secs is not None else None)  # fmt: skip
        return reply

    def _dequeued(self, result: str, reason: str) -> None:
        self.gw.telemetry.dequeued(self.who, result, reason, perf_counter() - self.queued_at)

    def listening(self) -> bool:
        """Can an engine event arrive before the next message (queued; preemptible work in flight)?"""
        return self.state == "queued" or (self.preemptible and self.admitted and not self.settled)

    # -- dispatch --
    def handle(self, msg: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        which = msg.WhichOneof("request")
        if which == "request_headers":
            return self.on_request_headers(msg)
        if which == "request_body":
            return self.on_request_body(msg.request_body)
        if which == "request_trailers":
            return self.on_request_trailers()
        if which == "response_headers":
            return self.on_response_headers(msg.response_headers)
        if which == "response_body":
            return self.on_response_body(msg.response_body)
        if which == "response_trailers":
            return self.on_response_trailers()
        return []

    def handle_signal(self, item: tuple[str, Any]) -> list[pb.ProcessingResponse]:
        kind, arg = item
        if kind == "admitted" and self.state == "queued":
            self._cancel_expiry()
            self._dequeued("admit", NONE)
            return self.forward()
        if kind == "rejected" and self.state == "queued":
            self._cancel_expiry()
            self.settled = True  # the engine already dropped it from the queue
            self.unregister()
            d: Decision = arg
            self._dequeued("reject", d.reason.value if d.reason is not None else NONE)
            return self._reply(self._refusal(d.reason, d.retry_after))
        if kind == "expire" and self.state == "queued":
            # Safety net: the engine should have answered by now. Give up on our own.
            self._dequeued("reject", Reason.QUEUE_TIMEOUT.value)
            self.settle()
            return self._reply(self._refusal(Reason.QUEUE_TIMEOUT, 1.0))
        if kind == "evict" and self.evicted and not self.done:
            return self.on_evict()
        return []

    # -- request phase --
    def on_request_headers(self, msg: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        h = msg.request_headers
        self.headers = _header_map(h)
        method = self.headers.get(":method", "")
        path = self.headers.get(":path", "")
        ep = endpoint_of(path)
        kind = ENDPOINTS.get(ep)

        ent = trusted_entitlement(self.gw.trusted, self.headers, _metadata(msg) if self.gw.trusted else None)
        if ent is None:
            key = bearer_key(self.headers.get("authorization"))
            if key is None:
                return self._reply(errors.unauthorized("Missing API key: send 'Authorization: Bearer <key>'."))
            ent = self.gw.keys.lookup(key)
            if ent is None:
                return self._reply(errors.unauthorized("Incorrect API key provided."))
        if self.gw.engine.entitlement_spec(ent) is None:
            return self._reply(errors.for_reason(Reason.ENTITLEMENT_REMOVED, None))
        self.entitlement = ent

        if kind is None:
            if ep in PASSTHROUGH:
                self.echo = True
                self.state = "forwarded"
                return [_headers_response("request_headers", self._identity_mutation())]
            return self._reply(errors.unknown_url(method, ep))
        if method != "POST":
            return self._reply(errors.method_not_allowed(method, ep))
        encoding = self.headers.get("content-encoding", "").strip().lower()
        if encoding not in ("", "identity"):
            return self._reply(errors.unsupported_encoding(encoding))
        length = self.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.gw.max_body_bytes:
            self.too_large = int(length)
            if self.too_large > DRAIN_FACTOR * self.gw.max_body_bytes:
                return self._reply(errors.too_large(self.too_large, self.gw.max_body_bytes))
        if h.end_of_stream:
            return self._reply(errors.bad_request("Request body is required.", "missing_body"))
        self.req_kind = kind
        self.state = "request_body"
        return []

    def on_request_body(self, b: pb.HttpBody) -> list[pb.ProcessingResponse]:
        if self.echo:
            return _body_responses("request_body", b.body, b.end_of_stream)
        if self.state != "request_body":
            return []
        limit = self.gw.max_body_bytes
        self.received += len(b.body)
        if self.too_large is None and self.received > limit:
            self.too_large = self.received
            self.body = bytearray()
        if self.too_large is not None:
            # Read (and drop) the rest before answering, so the client is still listening when the 413
            # comes (answering mid-upload makes Envoy reset the connection under the client's feet); past
            # DRAIN_FACTOR × the limit we stop being polite.
            if b.end_of_stream or self.received > DRAIN_FACTOR * limit:
                return self._reply(errors.too_large(max(self.too_large, self.received), limit))
            return []
        self.body += b.body
        if not b.end_of_stream:
            return []
        return self.decide()

    def on_request_trailers(self) -> list[pb.ProcessingResponse]:
        if self.echo:
            return [_trailers_response("request_trailers")]
        if self.state == "request_body" and self.too_large is not None:
            return self._reply(errors.too_large(max(self.too_large, self.received), self.gw.max_body_bytes))
        if self.state == "request_body":
            self.trailers_pending = True
            return self.decide()
        return [_trailers_response("request_trailers")]

    def decide(self) -> list[pb.ProcessingResponse]:
        gw = self.gw
        t0 = perf_counter()
        try:
            req = parse(self.req_kind, bytes(self.body))
        except BadRequest as exc:
            return self._reply(errors.bad_request(str(exc), exc.code))
        pool = gw.engine.pool_for_model(req.model)
        if pool is None:
            return self._reply(errors.model_not_found(req.model))
        spec = gw.engine.entitlement_spec(self.entitlement)
        if spec is None:  # removed by a reload while its body was arriving
            return self._reply(errors.for_reason(Reason.ENTITLEMENT_REMOVED, None))
        if spec.pool_ref.name != pool:
            reply = errors.model_not_found(req.model)
            reply.message = f"The model {req.model!r} is not available to your entitlement."
            return self._reply(reply)
        self.req = req
        self.preemptible = spec.qos.service_class is ServiceClass.PREEMPTIBLE
        self.estimate = gw.estimator.estimate(req)
        self.rid = uuid.uuid4().hex
        gw.live[self.rid] = self
        decision = gw.engine.admit(self.rid, self.entitlement, self.estimate.tokens, req.output_budget, gw.clock())
        self.decision = decision
        verdict, why = decision.verdict.value, decision.reason.value if decision.reason is not None else NONE
        if decision.would is not None:  # shadow mode: admitted, but enforcement would have queued or rejected it
            verdict = f"shadow_{decision.would.value}"
            gw.stats.shadow[f"{decision.would.value}:{why}"] += 1
            log.info("shadow", would=decision.would.value, reason=why, rid=self.rid, entitlement=self.entitlement)
        self.who = gw.telemetry.who(self.entitlement, spec.qos.service_class.value)
        gw.telemetry.decided(self.who, verdict, why, perf_counter() - t0)
        if tlogs.DECISIONS:
            log.debug("decision", rid=self.rid, entitlement=self.entitlement, result=verdict, reason=why)
        if decision.evict:
            gw.evict(decision.evict)
        if decision.verdict is Verdict.ADMIT:
            return self.forward()
        if decision.verdict is Verdict.QUEUE:
            self.state = "queued"
            self.queued_at = perf_counter()
            gw.stats.queued += 1
            deadline = decision.deadline if decision.deadline is not None else gw.clock() + 60.0
            # Never longer than the pool's queue timeout: after a wall clock stepped back the engine holds its
            # time (deadline − clock() would be the timeout plus the step), and this net must still fire.
            timeout = gw.engine.pool_spec(pool).queue.timeout_seconds
            delay = max(0.0, min(deadline - gw.clock(), timeout)) + QUEUE_GRACE_S
            self._expiry = asyncio.get_running_loop().call_later(delay, self.signal, ("expire", None))
            return []
        self.settled = True  # rejected: the engine holds nothing for it
        self.unregister()
        return self._reply(self._refusal(decision.reason, decision.retry_after))

    def forward(self) -> list[pb.ProcessingResponse]:
        gw = self.gw
        self.admitted = True
        self.state = "forwarded"
        gw.in_flight[self.entitlement] += 1
        gw.stats.admitted += 1
        reserved = self.decision.max_tokens if self.decision is not None else 0
        body = upstream_body(self.req, reserved)
        out = [_headers_response("request_headers", self._identity_mutation())]
        out += _body_responses("request_body", body if body is not None else bytes(self.body), not self.trailers_pending)
        if self.trailers_pending:
            out.append(_trailers_response("request_trailers"))
        self.body = bytearray()
        return out

    def _identity_mutation(self) -> pb.HeaderMutation:
        spec = self.gw.engine.entitlement_spec(self.entitlement)
        set_headers = {
            "x-tokenpools-entitlement": self.entitlement,
            "x-tokenpools-class": spec.qos.service_class.value,
            "x-tokenpools-tenant": spec.tenant_id,
        }
        if self.rid:
            set_headers["x-tokenpools-request-id"] = self.rid
        remove = [k for k in self.headers if k.startswith(HEADER_PREFIX) and k not in set_headers]
        if "authorization" in self.headers:  # the tenant's key ends here: the backend never sees (or logs) it
            remove.append("authorization")
        path = self.headers.get(":path", "")
        if "?" in path:  # nor a key sent in the query string (ignored for identity, but it would be logged upstream)
            clean = _without_key_params(path)
            if clean != path:
                set_headers[":path"] = clean
        return _mutation(set_headers, remove)

    # -- response phase --
    def on_response_headers(self, h: pb.HttpHeaders) -> list[pb.ProcessingResponse]:
        self.sent_response_headers = True
        if self.echo:
            self.done = h.end_of_stream
            return [_headers_response("response_headers")]
        headers = _header_map(h)
        status = headers.get(":status", "200")
        set_headers = dict(self.gw.ratelimit(self.entitlement)) if self.entitlement else {}
        if self.rid:
            set_headers["x-tokenpools-request-id"] = self.rid
        if not status.startswith("2"):
            # Upstream error (or a local reply after admission, e.g. no healthy upstream): nothing to meter.
            self.upstream_error = True
            self.settle()
        else:
            ctype = headers.get("content-type", "")
            self.meter = ResponseMeter(self.req.kind, "text/event-stream" in ctype, self.req.injects_usage)
        self.state = "response_body"
        if h.end_of_stream:
            self.settle(completed=True)
            self.done = True
        return [_headers_response("response_headers", _mutation(set_headers))]

    def on_response_body(self, b: pb.HttpBody) -> list[pb.ProcessingResponse]:
        if self.echo or self.meter is None or self.settled:
            self.done = b.end_of_stream
            return _body_responses("response_body", b.body, b.end_of_stream)
        out = self.meter.feed(b.body)
        if b.end_of_stream:
            out += self.meter.finish()
            self.settle(completed=True)
            self.done = True
            return _body_responses("response_body", out, True)
        if self.meter.output_tokens != self.progress_sent:
            self.progress_sent = self.meter.output_tokens
            self.gw.engine.progress(self.rid, self.progress_sent, self.gw.clock())
        return _body_responses("response_body", out, False)

    def on_response_trailers(self) -> list[pb.ProcessingResponse]:
        out: list[pb.ProcessingResponse] = []
        if self.meter is not None and not self.settled:
            rest = self.meter.finish()
            out += _body_responses("response_body", rest, False)
        self.settle(completed=True)
        self.done = True
        out.append(_trailers_response("response_trailers"))
        return out

    def on_evict(self) -> list[pb.ProcessingResponse]:
        """The engine took the capacity back (reservation already released): end the request now."""
        self.gw.stats.evicted += 1
        if self.who is not None:
            self.gw.telemetry.evicted(self.who)
        reply = self._refusal(Reason.EVICTED, 1.0)
        out: list[pb.ProcessingResponse] = []
        if self.sent_response_headers and self.meter is not None and self.meter.sse:
            # The client already has a 200 and part of a stream: tell it why the stream stops here.
            out += _body_responses("response_body", errors.sse_error_event(reply), False)
        # Before response headers this is a clean 429; after them Envoy can only reset the stream.
        out += self._reply(reply)
        return out

    # -- settling --
    def settle(self, completed: bool = False) -> None:
        """finish (real usage) or release (abort) this request's reservation, exactly once.

        completed: the response ended normally. Otherwise (client abort, upstream reset, shutdown) we still
        charge what was generated when tokens were streamed, and release when nothing was.
        """
        if self.settled or self.rid is None:
            self.settled = True
            return
        self.settled = True
        self._cancel_expiry()
        gw = self.gw
        now = gw.clock()
        meter = self.meter
        if self.admitted and meter is not None and not self.upstream_error and (completed or meter.output_tokens):
            inp = meter.input_tokens
            out = meter.final_output_tokens
            events = gw.engine.finish(self.rid, inp, out, now)
            st = gw.stats
            st.finished += 1
            st.dropped_usage_chunks += meter.dropped_events
            st.exact_usage += meter.usage is not None
            st.input_tokens += inp if inp is not None else (self.estimate.tokens if self.estimate else 0)
            st.output_tokens += out
            if self.estimate is not None and self.req is not None:
                gw.estimator.observe(self.req.model, self.estimate, inp)
                gw.telemetry.settled(self.who, self.req.model, self.estimate.tokens, inp, out)
        else:
            events = gw.engine.release(self.rid, now)
            gw.stats.released += 1
        self.unregister()
        gw.dispatch(events)

    def unregister(self) -> None:
        gw = self.gw
        if self.rid is not None and gw.live.get(self.rid) is self:
            del gw.live[self.rid]
            if self.admitted:
                gw.in_flight[self.entitlement] -= 1
                if gw.in_flight[self.entitlement] <= 0:
                    del gw.in_flight[self.entitlement]

    def _cancel_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None


class ExtProcServicer(pb_grpc.ExternalProcessorServicer):
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    async def Process(self, request_iterator, context):  # noqa: N802 (gRPC method name)
        """Read a message only when the exchange needs one, and wait on engine events only while one can come.

        So a stream that ends normally has no read pending when we return: grpc.aio leaks native memory for
        every call torn down with a read in flight or whose awaiting task is cancelled (grpc/grpc#43360), and
        Envoy resets the stream right after our last response. Only a queued or preemptible exchange that ends
        by an engine event (429 from the queue, eviction) still leaves a read behind."""
        gw = self.gw
        gw.stats.streams += 1
        gw.open_streams += 1
        inbox: asyncio.Queue = asyncio.Queue()
        ex = Exchange(gw, inbox)
        read: asyncio.Future | None = None  # the next message, when asked for while also waiting on the inbox
        try:
            while not ex.done:
                if not inbox.empty():
                    responses = ex.handle_signal(inbox.get_nowait())
                else:
                    if ex.listening():
                        if read is None:
                            read = asyncio.ensure_future(context.read())
                        event = asyncio.ensure_future(inbox.get())
                        await asyncio.wait((read, event), return_when=asyncio.FIRST_COMPLETED)
                        if event.done():  # (a message that came at the same time is kept in `read`)
                            responses = ex.handle_signal(event.result())
                            for resp in responses:
                                await context.write(resp)
                            continue
                        event.cancel()
                    try:
                        if read is not None:
                            msg, read = await read, None
                        else:
                            msg = await context.read()
                    except Exception:  # the stream was torn down under the read: as EOF
                        break
                    if msg is grpc.aio.EOF:
                        break
                    responses = ex.handle(msg)
                for resp in responses:
                    await context.write(resp)
        finally:
            gw.open_streams -= 1
            if read is not None and not read.done():
                read.cancel()
            # Client abort, upstream reset, server shutdown or an error above: give the reservation back.
            try:
                ex.settle()
            except Exception:  # never let a settle failure mask the original exception
                log.exception("settle failed", rid=ex.rid)
