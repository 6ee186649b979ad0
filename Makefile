# Two commands a newcomer needs: `make run` (the local stack) and `make test` (everything CI runs).
# Both build .venv from the pinned lock file first, so a fresh machine gets exactly what was tested.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-fast bench lock clean redis-server chromium

$(STAMP): requirements.lock pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes -r requirements.lock
	@# xds-protos ships old copies of opentelemetry-proto's modules over the real ones (the OTLP exporter then
	@# fails to import): reinstall opentelemetry-proto last, same pin and hashes.
	sed -n '/^opentelemetry-proto==/,/^[a-z]/p' requirements.lock | sed '$$d' > $(VENV)/otel-proto.txt
	$(BIN)/pip install --quiet --no-deps --force-reinstall --require-hashes -r $(VENV)/otel-proto.txt
	$(BIN)/python -c "import opentelemetry.exporter.otlp.proto.grpc.metric_exporter" \
		|| { echo "opentelemetry-proto is still shadowed by xds-protos' copies (see above)" >&2; exit 1; }
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/tokenpools up

test: $(STAMP) redis-server chromium
	$(BIN)/python -m pytest

# tests/state start their own redis-server on a free port. Install Debian's when it is missing (CI runs as root
# on a clean Debian machine); otherwise say why those tests will skip (under CI=true they fail instead).
redis-server:
	@command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing redis-server (apt-get)"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -qq redis-server >/dev/null 2>&1 || \
	  { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; }; \
	else echo "redis-server not found and cannot be installed here (needs root + apt-get): tests/state will skip" >&2; fi

# tests/ui render the status page in headless Chromium; installed the same way (skips without it, fails under CI=true).
chromium:
	@command -v chromium >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium (apt-get)"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -qq chromium >/dev/null 2>&1 || \
	  { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }; \
	else echo "chromium not found and cannot be installed here (needs root + apt-get): the tests/ui browser test will skip" >&2; fi

# Engine and unit tests only (no Envoy): seconds, for the edit loop.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not integration"

bench: $(STAMP)
	$(BIN)/tokenpools bench engine --json

# Re-pin after editing dependencies in pyproject.toml (needs network to the registry).
lock:
	$(PY) -m pip install --quiet uv && $(PY) -m uv pip compile pyproject.toml --extra test \
	  --python-version 3.11 --generate-hashes -o requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
