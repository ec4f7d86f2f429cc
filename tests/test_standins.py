import pandas as pd
import pytest

from effllm_lib import results, standins


@pytest.fixture
def committed(tmp_data, monkeypatch):
    monkeypatch.setenv("EFFLLM_COMMIT", "b" * 40)
    monkeypatch.setenv("EFFLLM_DIRTY", "0")
    results.save(pd.DataFrame({"mode": ["small only", "big only", "random 5%", "random 10%"],
                               "pass@1": [0.01, 0.5, 0.02, 0.03], "ci_lo": [0.0, 0.4, 0.0, 0.01],
                               "ci_hi": [0.02, 0.6, 0.04, 0.05], "big_token_pct": [0, 100, 6.8, 13.4]}),
                 "splitreason", "controller_modes_gpu", scale="full")
    results.save(pd.DataFrame({"coverage": [0.0, 0.05], "pipelined_s": [1000.0, 1290.0],
                               "big_only_s": [6400.0, 6400.0], "speedup": [6.4, 4.96]}),
                 "splitreason", "simulator_our_pair", scale="full")


def test_splitreason_rows_are_percent_with_intervals(committed):
    rows = {r["claim_id"]: r for r in standins.splitreason_rows()}
    assert rows["acc_random_5p05"]["ours"] == pytest.approx(2.0)
    assert (rows["acc_random_10"]["ours_lo"], rows["acc_random_10"]["ours_hi"]) == pytest.approx((1.0, 5.0))
    assert rows["time_splitr32_learned_5_simulated"]["ours"] == 1290.0
    assert all(r["stand_in"] for r in rows.values())
