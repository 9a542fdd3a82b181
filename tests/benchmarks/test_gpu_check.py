"""recsys.benchmarks.gpu_check in its smoke mode: the script a GPU run relies on works end to end on the CPU
(the Triton kernels through the interpreter), and its accuracy figures are what the kernels really give."""

from __future__ import annotations

import json
from pathlib import Path

from recsys.benchmarks.gpu_check import main


def test_smoke_run_reports_kernel_errors_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    report = main(["--smoke", "--sections", "abc", "--out", str(out)])

    assert json.loads(out.read_text())["accuracy"] == report["accuracy"]
    fp32 = [r for r in report["accuracy"] if r["dtype"] == "float32"]
    bf16 = [r for r in report["accuracy"] if r["dtype"] == "bfloat16"]
    assert [r["N"] for r in fp32] == [9, 24] and len(bf16) == 2
    grads = ("out", "dq", "dk", "dv", "dpos", "dts")
    # fp32 kernel = reference up to summation order; bf16 within its 8-bit mantissa.
    assert all(r[f"{g}_rel"] < 1e-5 for r in fp32 for g in grads)
    assert all(1e-5 < r["out_rel"] < 3e-2 for r in bf16)
    (speed,) = report["speed"]
    assert speed["triton_ms"] > 0 and speed["sdpa_ms"] > 0 and "compiled_ms" not in speed
    assert report["pooling"][0]["out_abs"] == 0.0 and report["pooling"][0]["grad_abs"] < 1e-6
