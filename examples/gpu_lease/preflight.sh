#!/usr/bin/env bash
# Call 1 ON THE GPU MACHINE: stage the first GGUF part, print versions, then run the very same
# conversion command on a tiny random model on CUDA (seconds): the check before the real run.
source examples/gpu_lease/stage.sh
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name(0))"
timeout 150 python3 examples/gpu_convert_default.py --device cuda --smoke --steps 20 --bf16 2>&1 \
  | grep -v "Loading weights\|Writing model" | tail -20
