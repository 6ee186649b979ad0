"""Building ext_proc messages the way Envoy sends them, and reading our answers."""

from __future__ import annotations

import orjson
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

CONFIG = """
apiVersion: tokenpools.io/v1alpha1
kind: TokenPool
metadata: {name: one}
spec:
  model: m-one
  perReplica: {tokensPerSecond: 1000000, concurrency: 1, kvCacheTokens: 100000}
  queue: {timeoutSeconds: 2}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenPool
metadata: {name: two}
spec:
  model: m-two
  perReplica: {tokensPerSecond: 1000000, concurrency: 2, kvCacheTokens: 100000}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenEntitlement
metadata: {name: g1, labels: {tokenpools.io/demo: "true"}}
spec:
  tenantId: t1
  poolRef: {name: one}
  qos: {serviceClass: guaranteed}
  resources: {concurrency: 1}
  defaults: {maxTokens: 10}
  auth: {apiKeys: [k-g1]}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenEntitlement
metadata: {name: g2, labels: {tokenpools.io/demo: "true"}}
spec:
  tenantId: t2
  poolRef: {name: two}
  qos: {serviceClass: guaranteed}
  resources: {concurrency: 2}
  auth: {apiKeys: [k-g2]}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenEntitlement
metadata: {name: p2, labels: {tokenpools.io/demo: "true"}}
spec:
  tenantId: t3
  poolRef: {name: two}
  qos: {serviceClass: preemptible}
  burst: {concurrency: 2}
  auth: {apiKeys: [k-p2]}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenPool
metadata: {name: zero}
spec:
  model: m-zero
  replicas: {min: 0, max: 2, current: 0}
  perReplica: {tokensPerSecond: 100, concurrency: 2, kvCacheTokens: 1000}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenEntitlement
metadata: {name: zs, labels: {tokenpools.io/demo: "true"}}
spec:
  tenantId: t4
  poolRef: {name: zero}
  qos: {serviceClass: spot}
  auth: {apiKeys: [k-zs]}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenEntitlement
metadata: {name: zg, labels: {tokenpools.io/demo: "true"}}
spec:
  tenantId: t5
  poolRef: {name: zero}
  qos: {serviceClass: guaranteed}
  resources: {concurrency: 1}
  auth: {apiKeys: [k-zg]}
"""


def _hmap(items: dict[str, str]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in items.items()])


def request_headers(key: str | None = "k-g1", path: str = "/v1/chat/completions", method: str = "POST",
                    extra: dict[str, str] | None = None, eos: bool = False) -> pb.ProcessingRequest:  # fmt: skip
    h = {":method": method, ":path": path, ":authority": "x", "content-type": "application/json", **(extra or {})}
    if key is not None:
        h["authorization"] = f"Bearer {key}"
    return pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=_hmap(h), end_of_stream=eos))


def request_body(data: bytes | dict, eos: bool = True) -> pb.ProcessingRequest:
    if isinstance(data, dict):
        data = orjson.dumps(data)
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=data, end_of_stream=eos))


def response_headers(status: int = 200, ctype: str = "application/json", eos: bool = False) -> pb.ProcessingRequest:
    h = {":status": str(status), "content-type": ctype}
    return pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=_hmap(h), end_of_stream=eos))


def response_body(data: bytes, eos: bool) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=data, end_of_stream=eos))


def chat(model: str = "m-one", **kw) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **kw}


def kinds(responses: list[pb.ProcessingResponse]) -> list[str]:
    return [r.WhichOneof("response") for r in responses]


def set_headers(resp: pb.ProcessingResponse, which: str) -> dict[str, str]:
    m = getattr(resp, which).response.header_mutation
    return {h.header.key: h.header.raw_value.decode() for h in m.set_headers}


def removed_headers(resp: pb.ProcessingResponse, which: str) -> list[str]:
    return list(getattr(resp, which).response.header_mutation.remove_headers)


def streamed(resp: pb.ProcessingResponse, which: str) -> tuple[bytes, bool]:
    s = getattr(resp, which).response.body_mutation.streamed_response
    return s.body, s.end_of_stream


def immediate(resp: pb.ProcessingResponse) -> tuple[int, dict[str, str], dict]:
    ir = resp.immediate_response
    headers = {h.header.key: h.header.raw_value.decode() for h in ir.headers.set_headers}
    return ir.status.code, headers, orjson.loads(ir.body)
