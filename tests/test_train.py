"""
train.py's options for the GPUs people have: the BF16 baseline, bfloat16 float parts, the FP8 matmul path,
and what a results row records about how it ran. (The core train.py tests are in test_eco.py.)
"""
import json
import math
import re

import pytest

import quant
import runs
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


def test_t_quantiles_and_a_paired_interval():
    """Student's t quantiles to 4 decimals (tables: 12.7062, 4.3027, 2.7764, 2.2622) and the interval's arithmetic."""
    assert [round(runs.t_quantile(df), 4) for df in (1, 2, 4, 9)] == [12.7062, 4.3027, 2.7764, 2.2622]
    mean, half = runs.paired_interval([0.01, 0.02, -0.005, 0.015, 0.0])
    sd = (sum((d - 0.008) ** 2 for d in [0.01, 0.02, -0.005, 0.015, 0.0]) / 4) ** 0.5
    assert math.isclose(mean, 0.008) and math.isclose(half, 2.7764451 * sd / 5 ** 0.5, rel_tol=1e-6)
    assert math.isnan(runs.paired_interval([0.01])[1])


def test_several_seeds_train_in_sub_folders_as_single_runs_and_report_paired_intervals(small_data, tmp_path, capsys):
    """--seeds=2: seed s's rows are exactly those of a plain run with --seed=s; results.json keeps every seed's
    rows and each method's mean, sd and paired interval to master weights; a second call trains nothing."""
    args = tiny_args(small_data, tmp_path / "two", "--methods=master_rtn,naive_rtn,eco_sr", "--seeds=2")
    summary = train.main(args)
    single = train.main(tiny_args(small_data, tmp_path / "one", "--methods=master_rtn,naive_rtn,eco_sr",
                                  "--seed=1338"))
    saved = json.loads((tmp_path / "two" / "results.json").read_text())
    assert sorted(saved["seeds"]) == ["1337", "1338"] and saved["methods"] == json.loads(json.dumps(summary))
    for name, row in single.items():
        assert saved["seeds"]["1338"][name]["val_loss"] == row["val_loss"], name
        assert saved["seeds"]["1338"][name]["state_hash"] == row["state_hash"], name
        losses = [saved["seeds"][s][name]["val_loss"] for s in ("1337", "1338")]
        assert summary[name]["val_losses"] == losses and math.isclose(summary[name]["mean"], sum(losses) / 2)
        diffs = [saved["seeds"][s][name]["val_loss"] - saved["seeds"][s]["fp8_master_rtn"]["val_loss"]
                 for s in ("1337", "1338")]
        lo, hi = summary[name]["interval"]
        assert math.isclose((lo + hi) / 2, sum(diffs) / 2) and (hi - lo) / 2 >= abs(diffs[0] - diffs[1]) / 2
    assert summary["fp8_master_rtn"]["interval"] == [0.0, 0.0]
    out = capsys.readouterr().out
    assert re.search(r"fp8_eco_sr +\d\.\d{4} +\d\.\d{4} +[+-]\d\.\d{4} \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\]  "
                     r"(contains 0: unresolved|resolved: (lower|higher))", out)
    assert (tmp_path / "two" / "seed_1337" / "log.txt").exists()
    train.main(args)
    assert "seed 1337: finished in" in capsys.readouterr().out
