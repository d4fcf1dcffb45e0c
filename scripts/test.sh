#!/usr/bin/env bash
# One command: set everything up (idempotent) and run the whole test suite:
# unit tests, kernel tests in namespaces of their own, BPF verifier tests, lint.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -ra "$@"
