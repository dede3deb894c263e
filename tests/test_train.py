"""
train.py's options for the GPUs people have: the BF16 baseline, bfloat16 float parts, the FP8 matmul path,
and what a results row records about how it ran. (The core train.py tests are in test_eco.py.)
"""
import math

import pytest

import quant
import train
from conftest import tiny_args


def test_the_bf16_baseline_and_dtype_bfloat16_run_under_autocast_and_are_recorded(small_data, tmp_path):
    """bf16 is the float model under bfloat16 autocast (float32 master weights, so 12 B/param like fp32); the
    quantized methods follow --dtype; fp32 stays float32 whatever --dtype says."""
    rows = train.main(tiny_args(small_data, tmp_path / "a", "--methods=fp32,bf16,eco_sr"))
    assert [rows[m]["dtype"] for m in ("fp32", "bf16", "fp8_eco_sr")] == ["float32", "bfloat16", "float32"]
    assert rows["bf16"]["bytes_per_param"] == rows["fp32"]["bytes_per_param"] == 12.0
    assert rows["bf16"]["val_loss"] != rows["fp32"]["val_loss"] and abs(rows["bf16"]["val_loss"] -
                                                                        rows["fp32"]["val_loss"]) < 0.05
    bf16 = train.main(tiny_args(small_data, tmp_path / "b", "--methods=fp32,eco_sr", "--dtype=bfloat16"))
    assert bf16["fp32"]["val_loss"] == rows["fp32"]["val_loss"] and bf16["fp8_eco_sr"]["dtype"] == "bfloat16"
    assert bf16["fp8_eco_sr"]["val_loss"] != rows["fp8_eco_sr"]["val_loss"]
    assert all(math.isfinite(r["val_loss"]) for r in (*rows.values(), *bf16.values()))


def test_the_fp8_matmul_path_and_the_fused_kernel_are_recorded_per_method(small_data, tmp_path):
    """On the CPU auto means simulated (results unchanged); scaled_mm can be forced and is then what ran."""
    auto = train.main(tiny_args(small_data, tmp_path / "auto", "--methods=fp32,eco_sr"))
    assert auto["fp32"]["matmul"] == {} and auto["fp8_eco_sr"]["matmul"] == {"simulated": 5}
    assert auto["fp8_eco_sr"]["fused"] is False and auto["fp8_eco_sr"]["peak_memory"] is None
    forced = train.main(tiny_args(small_data, tmp_path / "forced", "--methods=eco_sr", "--fp8_matmul=scaled_mm"))
    assert forced["fp8_eco_sr"]["matmul"] == {"scaled_mm": 5}
    assert abs(forced["fp8_eco_sr"]["val_loss"] - auto["fp8_eco_sr"]["val_loss"]) < 1e-3
    int8 = train.main(tiny_args(small_data, tmp_path / "int8", "--methods=eco_sr", "--fmt=int8",
                                "--fp8_matmul=scaled_mm"))
    assert int8["int8_eco_sr"]["matmul"] == {"simulated": 5}, "only fp8_e4m3 has an FP8 matmul"


@pytest.mark.parametrize("argv, message", [(["--dtype=float16"], "--dtype='float16' is out of range; accepted: "
                                            "float32, bfloat16"),
                                           (["--fp8_matmul=fast"], f"accepted: {', '.join(quant.MATMUL_PATHS)}")])
def test_bad_dtype_and_matmul_path_are_refused(argv, message):
    with pytest.raises(ValueError, match=message):
        train.parse_args(argv)
