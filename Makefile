# One command surface for developers, pre-commit and CI.
# Every target installs what it needs first: uv (via pip when absent), the venv, the embedded model.

UV := $(shell command -v uv 2>/dev/null || echo python3 -m uv)
SERVE_ARGS ?=
BENCH_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help uv install test-deps run server test testcov lint format typecheck check tunnel bench bench-layers clean

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

uv:
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv

install: uv ## Create or update the venv from uv.lock (with the embedded model and dev tools)
	@$(UV) sync --locked --all-extras --quiet

run: install ## Start the server on the embedded defaults (no keys, no .env needed), with the playground
	PLAYGROUND=$${PLAYGROUND:-true} $(UV) run --no-sync layercode-agent serve $(SERVE_ARGS)

server: run ## Same as `make run`

# System programs the tests run for real (CI's .ci/run installs them with apt).
test-deps:
	@command -v redis-server >/dev/null 2>&1 || { echo "make test needs redis-server: sudo apt-get install redis-server (Debian/Ubuntu) or brew install redis"; exit 1; }
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || [ -n "$$CHROMIUM_PATH" ] || { echo "make test needs Chromium: sudo apt-get install chromium (Debian/Ubuntu), or set CHROMIUM_PATH"; exit 1; }

test: install test-deps ## Run every test
	$(UV) run --no-sync pytest

testcov: install test-deps ## Run every test with branch coverage
	$(UV) run --no-sync coverage run -m pytest
	$(UV) run --no-sync coverage combine --quiet
	$(UV) run --no-sync coverage report

lint: install ## Lint and check formatting
	$(UV) run --no-sync ruff check src tests bench
	$(UV) run --no-sync ruff format --check src tests bench

format: install ## Format and autofix
	$(UV) run --no-sync ruff format src tests bench
	$(UV) run --no-sync ruff check --fix src tests bench

typecheck: install ## Type-check src and tests (pyright strict)
	$(UV) run --no-sync pyright

check: lint typecheck ## Lint + typecheck

tunnel: install ## Expose the local server to Layercode's cloud (npx @layercode/cli tunnel; needs LAYERCODE_AGENT_ID)
	$(UV) run --no-sync layercode-agent tunnel $(TUNNEL_ARGS)

# The full latency bench of BENCHMARKS.md beside the framework-free floor (about 15 minutes on 2 cores); figures go
# to test-artifacts/, the chart to test-artifacts/ and docs/bench.svg (BENCH_ARGS="--levels 1,10" for a quick look).
bench: install ## Latency bench beside the floor: memory/SQLite/Redis at 1-100 conversations, --workers 2, chart
	@command -v redis-server >/dev/null 2>&1 || { echo "make bench needs redis-server: sudo apt-get install redis-server (Debian/Ubuntu) or brew install redis"; exit 1; }
	@mkdir -p test-artifacts
	$(UV) run --no-sync python -m bench --json test-artifacts/bench.json --markdown test-artifacts/bench.md \
		--chart test-artifacts/bench.svg --chart docs/bench.svg $(BENCH_ARGS)

# Where a turn's CPU goes, layer by layer (httpx, OpenAI SDK, pydantic-ai model and agent, the turn), about 3 minutes.
bench-layers: install ## CPU per reply by layer of the stack (LAYERS_ARGS="--token-ms 0")
	@mkdir -p test-artifacts
	$(UV) run --no-sync python -m bench.layers --json test-artifacts/layers.json --markdown test-artifacts/layers.md $(LAYERS_ARGS)

clean: ## Remove caches (keeps data/ and .venv)
	rm -rf .pytest_cache .ruff_cache .coverage .coverage.* htmlcov dist build
