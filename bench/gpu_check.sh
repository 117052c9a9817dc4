#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): speed, memory, MFU and the FSDP / ZeRO save-resume-export paths on one GPU,
# printing one JSON line last. Nothing is downloaded (random models of real shapes). --smoke: tiny sizes on CPU.
#   bash bench/gpu_check.sh [--smoke] [--parts encoder,gradcache,lora,distributed] [--work_dir DIR]
# The project's .venv when there is one, else $PYTHON (default python3) with accelerate, transformers, peft,
# sentence-transformers (and deepspeed for the ZeRO runs).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec "$PYTHON" bench/gpu_check.py "$@"
