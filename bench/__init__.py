"""Benchmarks: each prints JSON; `tokenpools bench NAME` runs them."""
