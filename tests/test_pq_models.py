"""Our networks have exactly the PQ layers of the authors' layer tables, and the claims logic on a hand table."""
import pandas as pd
import pytest
import torch

from effllm_lib.pq import PQConfig, pq_convert_, pq_layers
from effllm_lib.pq import accelerator as A
from effllm_lib.pq import cnn, sweeps


@pytest.mark.parametrize("name, size", [("resnet20", (3, 32, 32)), ("kws", (1, 28, 28)), ("emnist", (1, 28, 28))])
def test_pq_layers_match_the_published_layer_tables(name, size):
    model = pq_convert_(cnn.MODELS[name]().eval(), PQConfig(n_prototypes=4, subvec_len=4))
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append((mod, args[0].shape)))
             for _, m in pq_layers(model)]
    with torch.no_grad():
        model(torch.randn(1, *size))
    for h in hooks:
        h.remove()
    table = A.load_layers(name)
    assert len(seen) == len(table)
    for (mod, shape), layer in zip(seen, table):
        assert (shape[1], shape[2], shape[3], mod.out_features) == (layer.in_ch, layer.in_h, layer.in_w,
                                                                     layer.out_ch)
        assert mod.kernel_size == (layer.kernel, layer.kernel) and mod.stride == (layer.stride, layer.stride)


def test_claims_from_a_hand_made_table():
    rows = [
        {"network": "kws", "experiment": "modes", "n_prototypes": 16, "subvec_len": 4, "proto_bits": None,
         "accuracy": 85.0, "float_accuracy": 90.0, "layer_mse": None},
        {"network": "kws", "experiment": "lowbit", "n_prototypes": 16, "subvec_len": 4, "proto_bits": 2,
         "lut_bits": 6, "accuracy": 84.0, "float_accuracy": 90.0, "layer_mse": None},
        {"network": "kws", "experiment": "lowbit", "n_prototypes": 16, "subvec_len": 4, "proto_bits": None,
         "accuracy": 86.0, "float_accuracy": 90.0, "layer_mse": None},
    ]
    # grid: MSE falls with N_p and rises with L_s -> rho = -1/sqrt(2)... computed by hand below
    for n_p, l_s, mse in [(4, 2, 2.0), (16, 2, 1.0), (4, 8, 4.0), (16, 8, 3.0)]:
        rows.append({"network": "kws", "experiment": "grid", "mode": "kmeans", "n_prototypes": n_p,
                     "subvec_len": l_s, "proto_bits": None, "accuracy": 50.0, "float_accuracy": 90.0,
                     "layer_mse": mse})
    out = sweeps.claims(pd.DataFrame(rows)).set_index("claim_id").ours
    assert out["accuracy_loss"] == pytest.approx(4.0)        # 90 - best float-table accuracy (86)
    assert out["lowbit_drop_kws"] == pytest.approx(2.0)      # 86 - 84
    # ranks of MSE (2,1,4,3) -> (2,1,4,3); N_p ranks (1.5,3.5,1.5,3.5): Pearson of ranks = -0.4472
    assert out["error_falls_with_np"] == pytest.approx(-1 / 5**0.5, rel=1e-3)
    assert out["error_rises_with_ls"] == pytest.approx(2 / 5**0.5, rel=1e-3)
    assert "lowbit_drop_resnet20" not in out.index  # networks not run give no row


def test_claims_choose_on_validation_and_average_seeds():
    rows = []
    # per seed: two float-table candidates; the one with the better validation accuracy has the worse held-out one
    for seed, (good_val_test, other_test) in enumerate([(80.0, 88.0), (82.0, 89.0), (84.0, 87.0)]):
        rows += [{"network": "kws", "seed": seed, "experiment": "modes", "proto_bits": None, "accuracy": good_val_test,
                  "val_accuracy": 85.0, "float_accuracy": 90.0, "layer_mse": None, "mode": "both"},
                 {"network": "kws", "seed": seed, "experiment": "modes", "proto_bits": None, "accuracy": other_test,
                  "val_accuracy": 70.0, "float_accuracy": 90.0, "layer_mse": None, "mode": "lut"}]
    out = sweeps.claims(pd.DataFrame(rows)).set_index("claim_id")
    # losses chosen on validation: 10, 8, 6 -> mean 8; sd 2, t(0.975, 2 dof) = 4.303 -> 4.303 * 2 / sqrt(3)
    assert out.loc["accuracy_loss", "ours"] == pytest.approx(8.0)
    assert out.loc["accuracy_loss", "ci95_halfwidth"] == pytest.approx(4.303 * 2 / 3**0.5, rel=1e-3)
    assert out.loc["accuracy_loss", "n_seeds"] == 3


def test_validation_split_is_disjoint_and_fixed():
    x = torch.arange(100).float().view(100, 1, 1, 1)
    y = torch.arange(100)
    (tx, ty), (vx, vy) = sweeps.split_validation((x, y), 0.1)
    assert len(vx) == 10 and len(tx) == 90
    assert set(ty.tolist()).isdisjoint(vy.tolist()) and set(ty.tolist()) | set(vy.tolist()) == set(range(100))
    assert torch.equal(sweeps.split_validation((x, y), 0.1)[1][1], vy)  # the same split every call
