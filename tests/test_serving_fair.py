"""The fair comparison: equal resources for every design, CPU pinning that really pins, ratios by hand."""
import os
import subprocess
import sys

import pandas as pd
import pytest

from effllm_lib.serving import fair


def test_parse_cpus():
    assert fair.parse_cpus(None) is None and fair.parse_cpus("") is None
    assert fair.parse_cpus("0") == (0,)
    if len(os.sched_getaffinity(0)) >= 2 and {0, 1} <= os.sched_getaffinity(0):
        assert fair.parse_cpus("0-1") == (0, 1) and fair.parse_cpus("1,0") == (0, 1)
    with pytest.raises(ValueError, match="CPU list"):
        fair.parse_cpus("a-b")
    with pytest.raises(ValueError, match="not available"):
        fair.parse_cpus("4096")


def test_pinned_command_confines_the_process_and_its_children():
    cpu = min(os.sched_getaffinity(0))
    child = "import os, subprocess, sys; print(sorted(os.sched_getaffinity(0))); sys.stdout.flush(); " \
            "subprocess.run([sys.executable, '-c', 'import os; print(sorted(os.sched_getaffinity(0)))'])"
    out = subprocess.run(fair.pinned_command([sys.executable, "-c", child], (cpu,)), capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == [f"[{cpu}]", f"[{cpu}]"]
    assert fair.pinned_command(["x"], None) == ["x"]


def test_every_batching_design_gets_the_same_batch_workers_and_threads():
    for name in (*fair.BASELINES, *fair.OPTIMIZED, "ceiling: pre-decoded pixels"):
        cfg = fair.design_config(name, batch=8, workers=3, threads=2)
        assert (cfg.max_batch_size, cfg.workers, cfg.threads) == (8, 3, 2), name
    pool = fair.design_config("optimized: combined + decode pool", batch=8, workers=3, threads=1)
    assert pool.decode_pool == 3 and pool.reduced and pool.normalize_on == "device"
    base = fair.design_config("prior work: batching, Pillow", batch=8, workers=3, threads=1)
    assert (base.decoder, base.reduced, base.normalize_on, base.decode_pool) == ("pil", False, "host", 0)
    naive = fair.design_config("naive", batch=8, workers=3, threads=1)
    assert (naive.max_batch_size, naive.workers) == (1, 1)
    # a server override (the accelerator) never changes a design's own settings
    assert not fair.design_config("prior work: batching, Pillow", batch=8, workers=1, threads=1,
                                  server={"reduced": True}).reduced
    with pytest.raises(ValueError, match="unknown design"):
        fair.design_config("magic", batch=8, workers=1, threads=1)


def test_ratios_against_the_best_baseline_by_hand():
    rows = []
    tp = {"b1": [10, 12, 11], "b2": [20, 18, 22], "opt": [40, 45, 33], "ceiling: pre-decoded pixels": [80, 80, 80]}
    role = {"b1": "baseline", "b2": "baseline", "opt": "optimized", "ceiling: pre-decoded pixels": "reference"}
    for d, vals in tp.items():
        for r, v in enumerate(vals):
            rows.append({"design": d, "role": role[d], "pass": r, "throughput_rps": v, "p50_ms": 1, "p99_ms": 2,
                         "mean_batch": 4, "requests_per_cpu_s": 1, "errors": 0})
    s = fair.ratios(pd.DataFrame(rows)).set_index("design")
    assert (s.best_baseline == "b2").all()
    assert s.loc["opt", "ratio_of_medians"] == pytest.approx(40 / 20)
    per_pass = [40 / 20, 45 / 18, 33 / 22]  # against b2 in the same pass
    assert s.loc["opt", "ratio_median"] == pytest.approx(sorted(per_pass)[1])
    assert (s.loc["opt", "ratio_min"], s.loc["opt", "ratio_max"]) == pytest.approx((min(per_pass), max(per_pass)))
    assert s.loc["b2", "ratio_median"] == 1 and s.loc["opt", "of_ceiling"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="baseline"):
        fair.ratios(pd.DataFrame(rows).query("role != 'baseline'"))


def test_bad_arguments():
    with pytest.raises(ValueError, match="scale"):
        fair.run("huge")
    with pytest.raises(ValueError, match="workers"):
        fair.run("ci", workers=0)


@pytest.mark.slow
def test_ci_run_pinned(tmp_path):
    cpus = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    out = fair.run("ci", server_cpus=cpus, server={"pretrained": False})
    s = out["summary"].set_index("design")
    assert list(s.index) == list(fair.SCALES["ci"]["designs"])
    assert (out["runs"].errors == 0).all() and (out["runs"].ok > 0).all()
    assert s.loc["prior work: batching, Pillow", "ratio_median"] == 1
    assert s.loc["optimized: combined", "mean_batch"] >= 1


def test_claims_name_the_fastest_optimized_design():
    summary = pd.DataFrame({"design": ["b", "o1", "o2"], "role": ["baseline", "optimized", "optimized"],
                            "throughput_rps": [10.0, 25.0, 30.0], "ratio_of_medians": [1.0, 2.5, 3.0],
                            "ratio_min": [1, 2, 2.8], "ratio_max": [1, 3, 3.3], "passes": [5, 5, 5],
                            "best_baseline": ["b"] * 3})
    c = fair.claims_from(summary, "here")
    assert c.claim_id.tolist() == [fair.CLAIM] and c.ours.tolist() == [3.0]
    assert "o2 vs b" in c.reason[0] and "2.80 to 3.30" in c.reason[0]
    assert fair.claims_from(summary[summary.role == "baseline"], "here").empty
