#!/usr/bin/env bash
# Call 3 ON THE GPU MACHINE: join the GGUF parts, check them, run the GPU conversion (continuing
# the shipped delta) until STOP seconds, and send the delta, its checksum, the log and the
# metrics back through $OUT.  Extra arguments go to `mtp convert` (e.g. --no-split-passes
# --attention flex, the fifth session's path).
set -u
source examples/gpu_lease/stage.sh
NAME=$(awk '{print $2}' /tmp/gguf/gguf.sha256); G=/tmp/gguf/$NAME
cat /tmp/gguf/p00 /tmp/gguf/p01 /tmp/gguf/p02 > "$G"
(cd /tmp/gguf && sha256sum -c gguf.sha256) || exit 3
export MTP_LM_DEFAULT_GGUF=$G
mkdir -p /tmp/run
if [ -f /tmp/data/corpus.jsonl ]; then cp /tmp/data/corpus.jsonl /tmp/run/corpus.jsonl; wc -l /tmp/run/corpus.jsonl; fi
timeout -k 30 "${HARD:-570}" python3 examples/gpu_convert_default.py --device cuda --out /tmp/run \
  --minutes 60 --stop-after "${STOP:-520}" --seed-prompts /tmp/data/train.jsonl --init-delta default \
  "$@" 2>&1 | grep -v "Loading weights\|Writing model\|de-quantizing" | tee "$OUT/convert.log"
D=/tmp/run/default_delta.safetensors
# Files come back at most 16 MiB each: the ~20 MB delta in parts (`cat delta.part0* > d`).
if [ -f $D ]; then sha256sum $D | tee "$OUT/delta.sha256"; split -b 15M -d $D "$OUT/delta.part"; fi
cp /tmp/run/smollm2-mtp.ckpt/metrics.jsonl "$OUT/" 2>/dev/null
# The corpus the teacher wrote (~6 MB gzipped): prepare.sh's 2nd argument next time.
gzip -c /tmp/run/corpus.jsonl > "$OUT/corpus.jsonl.gz" 2>/dev/null
ls -la "$OUT" /tmp/run/smollm2-mtp.ckpt
