"""The soft forward pass, prototypes-only training with derived tables, float-input MSE and the bootstrap, each
against an independent reference (explicit softmax sums, finite differences, brute-force tables, the binomial
normal approximation)."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from effllm_lib.pq.layers import PQConfig, PQLinear, pq_convert_, pq_layers, set_forward_, set_tau_
from effllm_lib.pq.temperature import TempScale, bootstrap_interval
from effllm_lib.pq.train import calibrate_, finetune_, layer_mse


def _layer(tau, forward="soft", seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    pq = PQLinear.from_dense(nn.Linear(6, 3), PQConfig(n_prototypes=4, subvec_len=3, tau=tau,
                                                        straight_through=forward == "straight_through"))
    pq.set_prototypes(torch.randn(2, 4, 3))
    return pq.to(dtype)


def _soft_reference(pq, x):
    """y[m, c] = bias[c] + sum_s sum_p softmax_p(-|x_s - P_sp|^2 / tau) LUT[s, p, c], with explicit loops."""
    tau = pq.config.tau
    out = torch.zeros(x.shape[0], pq.out_features, dtype=x.dtype)
    for m in range(x.shape[0]):
        for s in range(pq.n_subspaces):
            sub = x[m, 3 * s:3 * s + 3]
            d = torch.stack([((sub - pq.prototypes[s, p]) ** 2).sum() for p in range(4)])
            w = torch.exp(-(d - d.min()) / tau)
            w = w / w.sum()
            out[m] += sum(w[p] * pq.lut[s, p] for p in range(4))
        out[m] += pq.bias
    return out


def test_soft_forward_is_the_softmax_weighted_table_sum():
    pq = _layer(tau=0.5).train()
    x = torch.randn(5, 6)
    with torch.no_grad():
        torch.testing.assert_close(pq(x), _soft_reference(pq, x), rtol=1e-5, atol=1e-5)


def test_soft_forward_tends_to_the_hard_one_as_tau_falls():
    pq = _layer(tau=1.0)
    x = torch.randn(64, 6)
    with torch.no_grad():
        hard = pq.eval()(x)
        gaps = []
        for tau in (1.0, 0.1, 0.01, 1e-4):
            set_tau_(pq, tau)
            gaps.append(float((pq.train()(x) - hard).abs().max()))
    assert gaps[0] > 0.05  # at tau 1 the soft output is a real mixture, not the hard one
    assert all(a >= b for a, b in zip(gaps, gaps[1:])), gaps
    assert gaps[-1] < 1e-4, gaps


def test_soft_gradient_to_prototypes_matches_finite_differences():
    pq = _layer(tau=0.7, dtype=torch.float64).train()
    x = torch.randn(7, 6, dtype=torch.float64)
    weights = torch.randn(7, 3, dtype=torch.float64)

    def loss():
        return (pq(x) * weights).sum()

    loss().backward()
    grad = pq.prototypes.grad.clone()
    assert grad.abs().sum() > 0
    eps = 1e-6
    for idx in [(0, 0, 0), (0, 2, 1), (1, 3, 2)]:
        with torch.no_grad():
            pq.prototypes[idx] += eps
            up = float(loss())
            pq.prototypes[idx] -= 2 * eps
            down = float(loss())
            pq.prototypes[idx] += eps
        assert math.isclose(grad[idx].item(), (up - down) / (2 * eps), rel_tol=1e-4, abs_tol=1e-7)


def test_straight_through_has_the_hard_forward_and_the_soft_gradient():
    x = torch.randn(9, 6)
    soft, st = _layer(0.5, "soft").train(), _layer(0.5, "straight_through").train()
    torch.testing.assert_close(st(x), st.eval()(x))
    st.train()
    soft(x).sum().backward()
    st(x).sum().backward()
    torch.testing.assert_close(st.prototypes.grad, soft.prototypes.grad)


def test_set_forward_switches_every_layer_and_rejects_unknown_names():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    pq_convert_(model, PQConfig(n_prototypes=4, subvec_len=2), skip_roles=())
    set_forward_(model, "soft")
    assert all(not layer.config.straight_through for _, layer in pq_layers(model))
    with pytest.raises(ValueError, match="forward must be one of"):
        set_forward_(model, "hard")
    with pytest.raises(ValueError, match="runs must be"):
        TempScale(n_train=10, n_test=10, float_epochs=1, finetune_epochs=1, runs=(("both", "gumbel"),))


def _tiny(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))
    x, y = torch.randn(256, 8), torch.randint(0, 3, (256,))
    return model, x, y


@pytest.mark.parametrize("forward", ["soft", "straight_through"])
def test_prototypes_only_training_derives_the_tables(forward):
    model, x, y = _tiny()
    pq_convert_(model, PQConfig(n_prototypes=4, subvec_len=4, tau=1.0))
    calibrate_(model, x)
    set_forward_(model, forward)
    before = {n: (l.prototypes.detach().clone(), l.lut.detach().clone()) for n, l in pq_layers(model)}
    finetune_(model, (x, y), mode="prototypes_derived", epochs=2, lr=1e-2, batch_size=64)
    for name, layer in pq_layers(model):
        protos, lut = layer.prototypes.detach(), layer.lut.detach()
        assert not torch.equal(protos, before[name][0])  # the prototypes learned
        assert not layer.derive_lut
        # brute force: LUT[s, p, c] = sum_l P[s, p, l] W[c, s*L_s + l]
        w = layer.weight_2d
        ref = torch.zeros_like(lut)
        for s in range(layer.n_subspaces):
            ref[s] = protos[s] @ w[:, 4 * s:4 * s + 4].t()
        torch.testing.assert_close(lut, ref, rtol=1e-5, atol=1e-5)
    # the frozen-table mode leaves the LUT where k-means put it
    model2, _, _ = _tiny()
    pq_convert_(model2, PQConfig(n_prototypes=4, subvec_len=4, tau=1.0))
    calibrate_(model2, x)
    lut0 = pq_layers(model2)[0][1].lut.detach().clone()
    finetune_(model2, (x, y), mode="prototypes", epochs=1, lr=1e-2, batch_size=64)
    assert torch.equal(pq_layers(model2)[0][1].lut.detach(), lut0)


def test_float_input_mse_is_measured_on_the_float_networks_activations():
    model, x, _ = _tiny()
    float_model = nn.Sequential(*[m for m in model])  # same modules before conversion
    h1 = torch.relu(float_model[0](x)).detach()  # the second layer's float input, by hand
    pq_convert_(model, PQConfig(n_prototypes=2, subvec_len=4), skip_roles=("classifier",))
    calibrate_(model, x)
    (n1, l1), (n2, l2) = pq_layers(model)
    l2.eval()
    with torch.no_grad():
        ref = float(((l2(h1) - h1 @ l2.weight_2d.t() - l2.bias) ** 2).mean())
        quant_in = torch.relu(l1.eval()(x))
        ref_q = float(((l2(quant_in) - quant_in @ l2.weight_2d.t() - l2.bias) ** 2).mean())
    mse_float, mse_quant = layer_mse(model, x, "float"), layer_mse(model, x, "quantized")
    assert math.isclose(mse_float[n2], ref, rel_tol=1e-4)
    assert math.isclose(mse_quant[n2], ref_q, rel_tol=1e-4)
    assert not math.isclose(ref, ref_q, rel_tol=1e-3)  # the two inputs really differ
    assert bool(l1.calibrated) and bool(l2.calibrated)  # the exact-mode context restored the layers
    with pytest.raises(ValueError, match="inputs must be one of"):
        layer_mse(model, x, "dense")


def test_float_calibration_is_exact_when_prototypes_cover_the_points():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(3, 4)  # 3 distinct rows <= 4 prototypes: k-means on float inputs reproduces them
    pq_convert_(model, PQConfig(n_prototypes=4, subvec_len=2), skip_roles=("classifier",))
    calibrate_(model, x, inputs="float")
    assert all(v < 1e-10 for v in layer_mse(model, x, "float").values())


def test_bootstrap_interval_matches_the_binomial_normal_approximation():
    assert bootstrap_interval(np.ones(50)) == (100.0, 100.0)
    rng = np.random.default_rng(3)
    hits = rng.random(2000) < 0.7
    lo, hi = bootstrap_interval(hits, n_boot=2000)
    p = hits.mean()
    half = 1.96 * math.sqrt(p * (1 - p) / len(hits)) * 100
    assert lo < 100 * p < hi
    assert math.isclose((hi - lo) / 2, half, rel_tol=0.15)
    with pytest.raises(ValueError):
        bootstrap_interval([])


@pytest.mark.slow
def test_run_ci_has_every_row(one_thread):
    from effllm_lib.pq import temperature
    df = temperature.run("kws", "ci")
    sc = temperature.SCALES["ci"]
    t = df[(df.experiment == "temperature") & (df["mode"] != "kmeans")]
    assert len(t) == len(sc.runs) * len(sc.taus)
    assert (t.accuracy_lo <= t.accuracy).all() and (t.accuracy <= t.accuracy_hi).all()
    assert len(df[df.experiment == "mse"]) == len(sc.mse_np) * len(sc.mse_ls)
    s = temperature.summary(df)
    assert len(s) == len(t) + 1  # + the k-means row


def test_main_saves_after_each_seed_and_at_the_checkpoint(tmp_path, monkeypatch):
    import pandas as pd
    from effllm_lib import results
    from effllm_lib.pq import temperature
    saved = []
    real_save = results.save

    def fake_run(network, scale, *, seed, checkpoint=None, mse_grid=True, **kw):
        rows = pd.DataFrame([{"network": network, "seed": seed, "experiment": "temperature", "accuracy": 50.0}])
        checkpoint(rows)
        saved.append(("checkpoint", seed, mse_grid))
        return rows

    monkeypatch.setattr(temperature, "run", fake_run)
    monkeypatch.setattr(results, "save", lambda df, *a, **k: (saved.append(("save", len(df), k["params"]["partial"])),
                                                             real_save(df, *a, **k))[1])
    temperature.main(["--scale", "ci", "--seeds", "0", "1", "--out", str(tmp_path)])
    assert saved == [("save", 1, True), ("checkpoint", 0, True), ("save", 1, True),
                     ("save", 2, True), ("checkpoint", 1, False), ("save", 2, False)]
    df = results.read(tmp_path / "temperature_sweep_kws.csv")
    assert list(df.seed) == [0, 1] and df.attrs["provenance"]["params"]["seeds"] == [0, 1]


def test_mse_claims_use_float_inputs_when_every_grid_row_has_them():
    import pandas as pd
    from effllm_lib.pq import sweeps
    # prefix-input MSE falls with N_p, float-input MSE rises: the claim must follow the float column
    grid = pd.DataFrame({"network": "kws", "seed": 0, "experiment": "grid", "mode": "kmeans",
                         "n_prototypes": [4, 8, 16, 4, 8, 16], "subvec_len": [2, 2, 2, 4, 4, 4],
                         "layer_mse": [3.0, 2.0, 1.0, 6.0, 5.0, 4.0],
                         "layer_mse_float": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
                         "accuracy": 50.0, "float_accuracy": 60.0, "proto_bits": None})
    rows = sweeps.claims(grid).set_index("claim_id")
    expected = grid.n_prototypes.rank().corr(grid.layer_mse_float.rank())  # Spearman by hand
    assert rows.loc["error_falls_with_np", "ours"] == pytest.approx(expected) and expected > 0
    assert "float network's activations" in rows.loc["error_falls_with_np", "reason"]
    # one row without it (an older table): the prefix-input column for all
    old = grid.assign(layer_mse_float=[1.0, 2.0, 3.0, 4.0, 5.0, None])
    rows = sweeps.claims(old).set_index("claim_id")
    assert rows.loc["error_falls_with_np", "ours"] < 0
