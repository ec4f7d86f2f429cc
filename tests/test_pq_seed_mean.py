"""sweeps.seed_mean: one row per run configuration, averaged over seeds, by hand."""

import math

import pandas as pd
import pytest

from effllm_lib.pq import sweeps
from effllm_lib.pq.sweeps import seed_mean


def test_seed_mean_by_hand():
    nan = float("nan")
    df = pd.DataFrame({
        "network": ["kws"] * 4 + ["emnist"], "seed": [0, 0, 1, 1, 0],
        "experiment": ["float", "lowbit", "float", "lowbit", "float"],
        "n_prototypes": [nan] * 5, "subvec_len": [nan] * 5, "mode": [None] * 5, "tau": [nan] * 5,
        "proto_bits": [nan, 2.0, nan, 2.0, nan], "lut_bits": [nan, 6.0, nan, 6.0, nan],
        "accuracy": [90.0, 80.0, 89.0, 84.0, 70.0], "float_accuracy": [90.0, 90.0, 89.0, 89.0, 70.0]})
    df.attrs["sources"] = {"x": 1}
    out = seed_mean(df)
    assert len(out) == 3 and out.attrs["sources"] == {"x": 1}
    kws_low = out[(out.network == "kws") & (out.experiment == "lowbit")].iloc[0]
    assert kws_low.accuracy == 82.0 and kws_low.float_accuracy == 89.5 and kws_low.n_seeds == 2
    assert kws_low.proto_bits == 2.0 and math.isnan(out.iloc[0].proto_bits)
    assert list(out.network) == ["kws", "kws", "emnist"]  # first-seen order
    one = seed_mean(df[df.seed == 0])
    assert len(one) == 3 and (one.n_seeds == 1).all()
    assert one.accuracy.tolist() == pytest.approx([90.0, 80.0, 70.0])


def test_sweep_source_finds_single_and_per_seed_tables():
    df = pd.DataFrame({"network": ["kws"]})
    df.attrs["sources"] = {"accuracy_sweep_emnist": {"commit": "a"}, "accuracy_sweep_kws_seed10": {"commit": "c"},
                           "accuracy_sweep_kws_seed2": {"commit": "b"}, "accuracy_sweep_kws_extra": {"commit": "x"}}
    assert sweeps.sweep_source(df, "emnist") == {"commit": "a"}
    assert sweeps.sweep_source(df, "kws") == {"commit": "b"}       # the lowest seed, numerically (2 < 10)
    with pytest.raises(KeyError, match="resnet20"):
        sweeps.sweep_source(df, "resnet20")
