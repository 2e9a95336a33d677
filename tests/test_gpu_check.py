"""scripts/gpu_check.sh, the checks a lent GPU machine runs, proven here in its CPU smoke mode:
the same steps at toy sizes on the CPU (attention against fp64, grouped GEMMs, a run in every
dtype including FP8, the throughput runs and the planner's memory beside them)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # launches, forks or long runs: not in `make test-fast`

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def test_gpu_check_parses_and_its_cpu_smoke_mode_passes(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(SCRIPT), "--cpu", str(tmp_path)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    table = (tmp_path / "table.txt").read_text()
    checks = ["device", "attention", "grouped_gemm", "step_float32", "step_bfloat16", "step_fp8_tensorwise",
              "step_fp8_rowwise", "step_lora_sft", "llama3_8b_8_layers_bf16", "llama3_8b_8_layers_fp8", "mixtral_8x7b_2_layers"]
    rows = [line.split() for line in table.splitlines() if not line.startswith(" ")]
    assert [(row[0], row[1]) for row in rows] == [(name, "ok") for name in checks]
    assert "FP8 emulated in these matmuls" in table and "planned" in table
    assert (tmp_path / "attention.log").read_text().count(" ok") == 6
