"""Benchmarking: speed and quality of MTP decoding against baselines, and the cost curve.

- ``config``: ``BenchConfig`` and the default sweep (the one home of the bench defaults);
- ``prompts``: the bundled prompt file and ``load_prompts``;
- ``methods``: one class per decoding method behind the ``BenchMethod`` protocol;
- ``measure``: timing, forward counts, peak memory, the int8 copy, the teacher's score;
- ``quality``: GSM8K grading, agreement and likelihood metrics (pure functions);
- ``cost``: the cost curve of a forward pass and the cost-aware ``k_max``;
- ``report``: the typed report, its Markdown table and JSON;
- ``plot``: quality against speed-up (matplotlib loaded only when drawing);
- ``runner``: ``run_benchmark``, which puts them together.

Nothing is imported here, so loading one part (``mtp_torch.CostCurve``) loads no other.
"""
