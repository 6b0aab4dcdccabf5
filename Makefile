# mailgate — the two commands a newcomer needs:
#   make run    create .venv, install, initialise ./.mailgate and start the server
#   make test   create .venv, install (with Debian's postfix/swaks/testssl.sh), run every test
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?= $(CURDIR)/.mailgate
SERVER ?= EX01
DOMAIN ?= contoso.com
DEBIAN_PACKAGES := postfix swaks testssl.sh libnet-ssleay-perl libio-socket-ssl-perl chromium chromium-driver

.PHONY: run test bench deps venv clean

$(STAMP): pyproject.toml setup.py $(wildcard src/mailgate/*/_*.c)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

venv: $(STAMP)

# Debian packages the tests use as real peers. Installing postfix starts no daemon:
# the tests run their own instances with their own configuration directories.
deps:
	@missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && \
		echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

run: venv
	@test -f $(DATA)/mailgate.toml || $(BIN)/mailgate --home $(DATA) init --server $(SERVER) --domain $(DOMAIN)
	@exec $(BIN)/mailgate --home $(DATA) serve

test: venv deps
	$(BIN)/python -m pytest -n 2 -q

bench: venv deps
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
