"""Autoscaling from the capacity model: the controller loop, backend scraping, and KEDA's external scaler.

    capacity.py    pure: required capacity per pool and dimension, replicas needed, hysteresis
    backends.py    which backends are up, and their vLLM gauges (/metrics)
    controller.py  the loop: follow live replicas into the engine, decide desired replicas
    service.py     externalscaler.ExternalScaler (gRPC) for KEDA's `external-push` trigger
    kube.py        TokenPool / TokenEntitlement custom resources: list/watch into a Config, status back

How to run it and what the numbers mean: docs/autoscaling.md.
"""
