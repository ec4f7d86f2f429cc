"""PQ layers against independent references: the dense layer (exact prototypes), brute-force loops, k-means
on known clusters."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from effllm_lib.pq.layers import PQConfig, PQConv2d, PQLinear, pq_convert_, pq_layers, set_bits_
from effllm_lib.pq.train import calibrate_, finetune_, kmeans


def _subvectors(rows, layer):
    return F.pad(rows, (0, layer.pad)).view(rows.shape[0], layer.n_subspaces, -1).transpose(0, 1)


def test_linear_with_exact_prototypes_equals_dense():
    torch.manual_seed(0)
    dense = nn.Linear(10, 6)  # 10 = 2*4 + 2: the last subspace is padded with 2 zeros
    pq = PQLinear.from_dense(dense, PQConfig(n_prototypes=8, subvec_len=4)).eval()
    assert (pq.n_subspaces, pq.pad) == (3, 2)
    x = torch.randn(8, 10)
    pq.set_prototypes(_subvectors(x, pq))  # every input row is a prototype of every subspace
    torch.testing.assert_close(pq(x), dense(x), rtol=1e-5, atol=1e-5)


def test_conv_with_exact_prototypes_equals_dense_odd_size():
    torch.manual_seed(1)
    dense = nn.Conv2d(3, 5, 3, padding=1)  # D = 27, L_s = 4 -> N_s = 7, one padded zero
    pq = PQConv2d.from_dense(dense, PQConfig(n_prototypes=4, subvec_len=4)).eval()
    assert (pq.n_subspaces, pq.pad) == (7, 1)
    x = torch.randn(1, 3, 2, 2)  # 4 output pixels = 4 im2col rows = 4 prototypes
    pq.set_prototypes(_subvectors(pq.rows(x), pq))
    torch.testing.assert_close(pq(x), dense(x), rtol=1e-5, atol=1e-5)


def test_uncalibrated_layer_is_exact():
    torch.manual_seed(2)
    dense = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    pq = PQConv2d.from_dense(dense, PQConfig(n_prototypes=4, subvec_len=9))
    x = torch.randn(2, 4, 7, 7)
    torch.testing.assert_close(pq(x), dense(x), rtol=1e-5, atol=1e-5)


def test_lut_and_output_match_brute_force_loops():
    torch.manual_seed(3)
    cin, cout, l_s, n_p = 7, 3, 3, 5  # D = 7 -> N_s = 3, pad 2
    dense = nn.Linear(cin, cout)
    pq = PQLinear.from_dense(dense, PQConfig(n_prototypes=n_p, subvec_len=l_s)).eval()
    protos = torch.randn(pq.n_subspaces, n_p, l_s)
    pq.set_prototypes(protos)
    w = dense.weight.detach()
    # brute-force LUT with Python loops; padded coordinates count as zero
    for s in range(pq.n_subspaces):
        for p in range(n_p):
            for c in range(cout):
                ref = sum(protos[s, p, l].item() * w[c, s * l_s + l].item()
                          for l in range(l_s) if s * l_s + l < cin)
                assert math.isclose(pq.lut[s, p, c].item(), ref, rel_tol=1e-5, abs_tol=1e-5)
    x = torch.randn(6, cin)
    out = pq(x)
    for m in range(6):
        for c in range(cout):
            total = dense.bias[c].item()
            for s in range(pq.n_subspaces):
                sub = [x[m, s * l_s + l].item() if s * l_s + l < cin else 0.0 for l in range(l_s)]
                dists = [sum((sub[l] - (protos[s, p, l].item() if s * l_s + l < cin else 0.0)) ** 2
                             for l in range(l_s)) for p in range(n_p)]
                total += pq.lut[s, dists.index(min(dists)), c].item()
            assert math.isclose(out[m, c].item(), total, rel_tol=1e-4, abs_tol=1e-4)


def test_soft_assignment_is_differentiable_and_hard_at_small_tau():
    torch.manual_seed(4)
    pq = PQLinear.from_dense(nn.Linear(8, 4), PQConfig(n_prototypes=6, subvec_len=4, tau=1e-4,
                                                        straight_through=False))
    pq.set_prototypes(torch.randn(2, 6, 4))
    x = torch.randn(16, 8)
    hard = pq.eval()(x)
    soft = pq.train()(x)
    torch.testing.assert_close(soft, hard, rtol=1e-3, atol=1e-3)  # tau -> 0: softmax -> one-hot
    pq.config = PQConfig(n_prototypes=6, subvec_len=4, tau=1.0, straight_through=False)
    pq.train()(x).sum().backward()
    assert pq.prototypes.grad.abs().sum() > 0 and pq.lut.grad.abs().sum() > 0


def test_straight_through_forward_equals_hard_output():
    torch.manual_seed(5)
    pq = PQLinear.from_dense(nn.Linear(8, 4), PQConfig(n_prototypes=6, subvec_len=4, tau=1.0))
    pq.set_prototypes(torch.randn(2, 6, 4))
    x = torch.randn(16, 8)
    torch.testing.assert_close(pq.train()(x), pq.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 4, 6])
def test_low_bit_tables_use_at_most_2_pow_bits_levels(bits):
    torch.manual_seed(6)
    pq = PQLinear.from_dense(nn.Linear(12, 5), PQConfig(n_prototypes=16, subvec_len=4, proto_bits=bits,
                                                        lut_bits=bits))
    pq.set_prototypes(torch.randn(3, 16, 4))
    protos, lut = pq.quantized_tables()
    assert protos.unique().numel() <= 2**bits
    for c in range(5):
        assert lut[:, :, c].unique().numel() <= 2**bits - 1  # symmetric grid: -qmax..qmax
    # the error shrinks with more bits (8 bits closer to float than 2 bits)
    x = torch.randn(64, 12)
    ref = pq.eval()
    set_bits_(nn.Sequential(ref), None, None)
    exact = ref(x)
    errs = {}
    for b in (2, 8):
        set_bits_(nn.Sequential(ref), b, b)
        errs[b] = (ref(x) - exact).pow(2).mean().item()
    assert errs[8] < errs[2]


def test_kmeans_recovers_separated_clusters():
    gen = torch.Generator().manual_seed(7)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    pts = centers.repeat(50, 1) + 0.1 * torch.randn(200, 2, generator=gen)
    found = kmeans(pts.unsqueeze(0), 4, seed=0)[0]
    dist = torch.cdist(found, centers)
    assert dist.min(1).values.max() < 0.1 and len(set(dist.argmin(1).tolist())) == 4


def _tiny_net():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 3))


def test_convert_calibrate_finetune_modes():
    torch.manual_seed(8)
    net = _tiny_net()
    x, y = torch.randn(64, 1, 6, 6), torch.randint(0, 3, (64,))
    ref = net(x).detach()
    pq_convert_(net, PQConfig(n_prototypes=8, subvec_len=9), skip_roles=("first_conv",))
    names = [n for n, _ in pq_layers(net)]
    assert names == ["2", "5"]  # the first conv was skipped; conv 2 and the linear converted
    torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5)  # uncalibrated = exact
    calibrate_(net, x)
    assert all(bool(m.calibrated) for _, m in pq_layers(net))
    before = {n: (m.prototypes.detach().clone(), m.lut.detach().clone()) for n, m in pq_layers(net)}
    finetune_(net, (x, y), mode="lut", epochs=1, batch_size=16)
    for n, m in pq_layers(net):
        assert torch.equal(m.prototypes, before[n][0]) and not torch.equal(m.lut, before[n][1])
    lut_after = {n: m.lut.detach().clone() for n, m in pq_layers(net)}
    finetune_(net, (x, y), mode="prototypes", epochs=1, batch_size=16)
    for n, m in pq_layers(net):
        assert torch.equal(m.lut, lut_after[n]) and not torch.equal(m.prototypes, before[n][0])
        pad_coords = (m.proto_mask == 0).expand_as(m.prototypes)
        assert torch.all(m.prototypes[pad_coords] == 0)  # padded coordinates stay zero


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="n_prototypes"):
        PQConfig(n_prototypes=0)
    with pytest.raises(ValueError, match="proto_bits"):
        PQConfig(proto_bits=1)
    with pytest.raises(ValueError, match="tau"):
        PQConfig(tau=0)
    with pytest.raises(ValueError, match="groups"):
        PQConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2), PQConfig())
    with pytest.raises(TypeError):
        PQLinear.from_dense(nn.Conv2d(4, 4, 3), PQConfig())
    pq = PQConv2d.from_dense(nn.Conv2d(4, 4, 3), PQConfig())
    with pytest.raises(ValueError, match="expected input"):
        pq(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="shape"):
        pq.set_prototypes(torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="no Conv2d/Linear"):
        pq_convert_(nn.Sequential(nn.ReLU()), PQConfig())
    with pytest.raises(ValueError, match="mode"):
        finetune_(nn.Sequential(pq), (torch.zeros(1, 4, 3, 3), torch.zeros(1).long()), mode="weights")


# ------------------------------------------------------------------ conversion of a user's CNN (padding, roles)
class _UserCNN(nn.Module):
    """Names unlike this project's (no stem/fc): features.* convs with padding='same', a head.* classifier."""

    def __init__(self, padding_mode="zeros"):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding="same", padding_mode=padding_mode), nn.ReLU(),
            nn.Conv2d(8, 8, 4, padding="same", padding_mode=padding_mode), nn.ReLU(),  # even kernel: asymmetric
            nn.Conv2d(8, 6, (3, 2), padding="same", dilation=(2, 1)), nn.ReLU(),
            nn.Conv2d(6, 6, 3, stride=2, padding="valid"), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 3 * 3, 16), nn.ReLU(), nn.Linear(16, 5))

    def forward(self, x):
        return self.head(self.features(x))


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular"])
def test_user_cnn_with_same_padding_converts_and_stays_exact(padding_mode):
    torch.manual_seed(0)
    net = _UserCNN(padding_mode)
    x = torch.randn(3, 3, 7, 7)
    ref = net(x).detach()
    pq_convert_(net, PQConfig(n_prototypes=4, subvec_len=5))
    # by role: the first conv (features.0) and the classifier (head.3, the last Linear) stay dense
    assert [n for n, _ in pq_layers(net)] == ["features.2", "features.4", "features.6", "head.1"]
    assert type(net.features[0]) is nn.Conv2d and type(net.head[3]) is nn.Linear
    torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5)  # uncalibrated PQ layers compute the dense conv


def test_same_padding_rows_match_dense_conv_with_exact_prototypes():
    """A calibrated layer whose prototypes are exactly the input's sub-vectors reproduces F.conv2d('same')."""
    torch.manual_seed(1)
    conv = nn.Conv2d(1, 5, (2, 3), padding="same", bias=True)
    x = torch.randint(0, 2, (2, 1, 5, 4)).float()  # binary patches: every 3-long sub-vector is one of 8
    pq = PQConv2d.from_dense(conv, PQConfig(n_prototypes=8, subvec_len=3))
    corners = torch.tensor([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)]).float()
    pq.set_prototypes(corners.expand(pq.n_subspaces, 8, 3).clone())
    assert pq.pads == (1, 1, 0, 1)  # PyTorch puts the odd extra row at the bottom
    torch.testing.assert_close(pq.eval()(x), conv(x), rtol=1e-5, atol=1e-5)


def test_roles_and_skip_names_are_checked():
    net = _UserCNN()
    cfg = PQConfig(n_prototypes=4, subvec_len=5)
    with pytest.raises(ValueError, match="no module of"):
        pq_convert_(net, cfg, skip=("stem",))  # this model has no 'stem': a typo must not convert it silently
    with pytest.raises(ValueError, match="unknown skip_roles"):
        pq_convert_(net, cfg, skip_roles=("stem",))
    with pytest.raises(TypeError, match="sequences of names"):
        pq_convert_(net, cfg, skip="features.0")
    pq_convert_(net, cfg, skip=("features",), skip_roles=())  # a name skips everything under it
    assert [n for n, _ in pq_layers(net)] == ["head.1", "head.3"]


def test_grouped_conv_error_names_the_layer():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 8, 1),
                        nn.Flatten(), nn.Linear(8, 2))
    cfg = PQConfig(n_prototypes=4, subvec_len=4)
    with pytest.raises(ValueError, match=r"layer '1' is a grouped conv \(groups=8\)"):
        pq_convert_(copy.deepcopy(net), cfg)
    pq_convert_(net, cfg, on_unsupported="skip")
    assert [n for n, _ in pq_layers(net)] == ["2"]
    with pytest.raises(ValueError, match="stride 1"):
        PQConv2d(3, 4, 3, cfg, stride=2, padding="same")


def test_same_padding_layer_reloads_from_state_dict():
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 6, 4, padding="same")
    a = PQConv2d.from_dense(conv, PQConfig(n_prototypes=4, subvec_len=8))
    a.set_prototypes(torch.randn_like(a.prototypes))
    b = PQConv2d(4, 6, 4, PQConfig(n_prototypes=4, subvec_len=8), padding="same")
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 4, 6, 5)
    torch.testing.assert_close(b.eval()(x), a.eval()(x))
    assert b(x).shape == (2, 6, 6, 5)
