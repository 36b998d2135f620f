"""Benchmarking: speed and quality of MTP decoding against baselines, and the cost curve."""
