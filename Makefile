# One entry point for every habit; CI (.ci/run) calls the same targets.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
HOST   ?= 127.0.0.1
PORT   ?= 8000
DEMO_PORT ?= 8001

.PHONY: install run test lint format migrate bench clean worker beat

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

migrate: install
	$(BIN)/python manage.py migrate --noinput

## Run the service: migrate, seed the demo (a week of history) on an empty database, serve
## on $(HOST):$(PORT) with the built-in demo model on port $(DEMO_PORT) and demo traffic.
run: migrate
	$(BIN)/python manage.py seed_demo --if-empty --demo-url http://127.0.0.1:$(DEMO_PORT)/v1
	$(BIN)/python -m stagegate.serve --host $(HOST) --port $(PORT) --demo-upstream --demo-port $(DEMO_PORT)

## Production background work (needs REDIS_URL): a Celery worker, and exactly one beat.
worker: install
	$(BIN)/celery -A stagegate worker --loglevel=INFO

beat: install
	mkdir -p $(or $(STAGEGATE_VAR_DIR),var)
	$(BIN)/celery -A stagegate beat --loglevel=INFO --schedule $(or $(STAGEGATE_VAR_DIR),var)/celerybeat-schedule

## Run the test suite (embedded mode unless DATABASE_URL / REDIS_URL are set).
test: install
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache .hypothesis

## Benchmarks print figures (see docs/performance.md); they never fail a build.
bench: install
	$(BIN)/python -m pip install --quiet -e ".[bench]"  # granian, pyreqwest: measured only
	$(BIN)/python bench/keys.py
	$(BIN)/python bench/http_clients.py
	$(BIN)/python bench/servers.py
	$(BIN)/python bench/proxy.py
	$(BIN)/python bench/proxy.py --upstream nginx
	$(BIN)/python bench/modes.py --scaling  # production vs embedded, 1 vs 2 workers (~30 min)
	$(BIN)/python bench/gateway.py
	$(BIN)/python bench/screening.py --live  # prompt screening: 0, 50 and 1,000 rules
	$(BIN)/python bench/deadlines.py
	$(BIN)/python bench/usage_record.py
	$(BIN)/python bench/reviews.py
	$(BIN)/python bench/console.py
