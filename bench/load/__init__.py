"""Processes the overhead benchmark starts: a fast backend, the ext_proc server, the load generator, the
engine-only queue probe. Each runs as its own process (`python -m bench.load.<name>`) so that its CPU time
can be read from /proc/PID/stat apart from the others'."""
