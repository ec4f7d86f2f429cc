"""The paired accuracy change between two evaluations of the same problems."""

import pandas as pd
import pytest

from effllm_lib.offload.evaluate_trained import paired_change


def _records(correct: dict) -> pd.DataFrame:
    return pd.DataFrame({"problem_id": list(correct), "correct": list(correct.values())})


def test_paired_change_by_hand():
    before = _records({"a": 0, "b": 1, "c": 0, "d": 0})
    after = _records({"d": 1, "c": 1, "b": 1, "a": 0})  # other order: paired by id, not by row
    out = paired_change(before, after)
    assert (out["before"], out["after"], out["change"]) == pytest.approx((0.25, 0.75, 0.5))
    assert out["lo"] <= 0.5 <= out["hi"] and out["problems"] == 4
    # every resample of these pairs changes by 0, 1/4, ..., 1 (never negative: no problem got worse)
    assert out["lo"] >= 0.0


def test_paired_change_refuses_unshared_problems():
    with pytest.raises(ValueError, match="same problems"):
        paired_change(_records({"a": 0, "b": 1}), _records({"a": 0, "c": 1}))
