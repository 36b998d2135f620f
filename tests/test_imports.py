"""What `import mtp_torch` loads: heavy or platform-specific modules load lazily."""

from __future__ import annotations


def test_importing_mtp_torch_stays_light() -> None:
    """`import mtp_torch` loads neither the benchmark nor the Unix-only `resource` module."""
    import subprocess
    import sys

    code = (
        "import sys, mtp_torch; "
        "heavy = [m for m in ('mtp_torch.bench.runner', 'mtp_torch.bench.cost', 'resource', 'matplotlib') "
        "if m in sys.modules]; "
        "assert not heavy, heavy; "
        "assert mtp_torch.BenchConfig().max_new_tokens > 0; "
        "assert 'mtp_torch.bench.runner' in sys.modules"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
