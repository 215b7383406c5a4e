.DEFAULT_GOAL := help

help: ## Show this help
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install: ## Install fineserve with test extras (builds the Rust extension)
	pip install -e '.[test]'

test: ## Run pytest and cargo test (the README's test command)
	python -m pytest && cargo test

test-fast: ## The fast tier: pytest without the slow, vllm and gpu tests (under a minute)
	python -m pytest -m "not slow and not vllm and not gpu"

lint: ## fmt, clippy, ruff, mypy and stubtest
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --features python -- -D warnings
	ruff check python tests benches
	ruff format --check python tests benches
	mypy python/fineserve
	python -m mypy.stubtest fineserve._engine

# manylinux2014 = manylinux_2_17: glibc >= 2.17 (RHEL/CentOS 7+, Debian 9+, Ubuntu 18.04+,
# Amazon Linux 2+). zig links against that glibc from any host; maturin then checks the
# library's symbol versions against the policy and fails the build if one is newer.
wheel: ## Build the prebuilt wheel: dist/fineserve-*-cp39-abi3-manylinux*.whl (any CPython >= 3.9)
	python -m pip install -q 'maturin[zig]>=1.5,<2'
	rm -f dist/fineserve-*.whl
	python -m maturin build --release --zig --compatibility manylinux2014 --out dist

wheel-test: wheel ## Install that wheel in a fresh venv with no Rust on PATH and blast the mock
	FINESERVE_WHEEL="$$(ls dist/fineserve-*.whl)" python -m pytest tests/test_wheel.py

format: ## Format Rust and Python
	cargo fmt --all
	ruff format python tests benches
	ruff check --fix python tests benches

bench: ## Engine figures against the embedded mock
	python benches/bench_dispatch.py

.PHONY: help install test test-fast lint wheel wheel-test format bench
