# Sourced by the other lease scripts ON THE GPU MACHINE (idempotent): the carried GGUF parts go to
# /tmp/gguf, the carried data (.gz) to /tmp/data, the wheels into /tmp/site; sets PYTHONPATH.
export PYTHONUNBUFFERED=1 MTP_LM_CACHE=/tmp/cache
mkdir -p /tmp/gguf /tmp/site /tmp/data
cp .dev/p0? .dev/gguf.sha256 /tmp/gguf/ 2>/dev/null; ls -la /tmp/gguf
for f in .dev/*.jsonl.gz; do [ -f "$f" ] && gunzip -c "$f" > "/tmp/data/$(basename "$f" .gz)"; done
wc -l /tmp/data/* 2>/dev/null
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD:$PWD/backends/numpy:$PWD/backends/torch
