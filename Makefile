.DEFAULT_GOAL := help

help: ## Show this help
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install: ## Install fineserve with test extras (builds the Rust extension)
	pip install -e '.[test]'

test: ## Run pytest and cargo test (the README's test command)
	python -m pytest && cargo test

lint: ## fmt, clippy, ruff and stubtest
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --features python -- -D warnings
	ruff check python tests benches
	ruff format --check python tests benches
	python -m mypy.stubtest fineserve._engine

format: ## Format Rust and Python
	cargo fmt --all
	ruff format python tests benches
	ruff check --fix python tests benches

bench: ## Engine figures against the embedded mock
	python benches/bench_dispatch.py

.PHONY: help install test lint format bench
