# The two commands of the README: `make up` and `make test`. Both install what they
# need first (idempotent; a fresh machine takes a few minutes, later runs seconds).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install system up test protos check-protos lint

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	# xds-protos ships an old copy of opentelemetry/proto/* over opentelemetry-proto's own
	# files (the OTLP exporter then fails to import): put the real ones back.
	$(BIN)/pip install --quiet --disable-pip-version-check --force-reinstall --no-deps \
		"opentelemetry-proto==$$($(BIN)/python -c 'from importlib.metadata import version; print(version("opentelemetry-proto"))')"
	touch $(STAMP)

install: $(STAMP)

# Debian packages the tests need: PostgreSQL (the registry runs its tests on it too),
# redis-server (limits and the cache shared by gateway replicas), prometheus (promtool
# checks and unit-tests the SLO rules) and chromium (the console's real-browser test).
system:
	(ls /usr/lib/postgresql/*/bin/pg_ctl && command -v redis-server && command -v promtool \
		&& test -x /usr/bin/chromium) >/dev/null 2>&1 || \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
			postgresql redis-server prometheus chromium)

up: install
	$(BIN)/servemesh up

# Contracts (stubs in sync, buf lint, buf breaking), lint, then every test. The real
# vLLM engine and the model are set up by the test session on first use.
test: install system check-protos lint
	$(BIN)/servemesh models prepare
	$(BIN)/pytest

protos: install
	$(BIN)/python -m devtools.protos generate

check-protos: install
	$(BIN)/python -m devtools.protos check
	$(BIN)/python -m devtools.protos lint
	$(BIN)/python -m devtools.protos breaking

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
