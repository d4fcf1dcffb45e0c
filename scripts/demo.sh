#!/usr/bin/env bash
# One command: set everything up (idempotent) and run `kernform demo` in the sandbox lab.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/kernform demo "$@"
