"""Training: the distillation config, step and loop, its data, corpus and checkpoints."""
