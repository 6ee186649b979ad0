"""The Envoy adapter: an ext_proc gRPC server that turns OpenAI requests into engine decisions and back.

Read top to bottom: `openai` parses the request once, `identity` maps the caller to an entitlement, `tokens`
estimates input tokens, `service` asks the engine and answers Envoy, `metering` counts what the backend
streams back, `errors` words the refusals.
"""
