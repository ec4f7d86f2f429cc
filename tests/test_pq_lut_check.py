"""The notebook's LUT-kernel check: its references are the PQ layer itself, and every kernel passes them."""
import pytest
import torch

from effllm_lib.pq import lut_check


def test_table_sum_is_the_pq_layers_output():
    import torch.nn as nn
    from effllm_lib.pq import PQConfig, PQConv2d
    torch.manual_seed(0)
    layer = PQConv2d.from_dense(nn.Conv2d(8, 5, 1), PQConfig(n_prototypes=4, subvec_len=4)).eval()
    layer.set_prototypes(torch.randn(2, 4, 4))
    x = torch.randn(2, 8, 3, 3)
    rows = layer.rows(x)
    ref = lut_check.table_sum(layer, layer.encode(rows)).view(2, 3, 3, 5).permute(0, 3, 1, 2)
    torch.testing.assert_close(ref, layer(x))


def test_every_kernel_here_passes_on_a_kws_layer(one_thread):
    df = lut_check.check(["kws_4"], batch=1)
    assert len(df) == 2 * len(set(df.kernel))
    assert (df.codes_match == 1.0).all() and df.within_bound.all()
    assert (df.max_err > 0).all()  # int8 tables really round


def test_shape_names_are_checked():
    with pytest.raises(ValueError, match="look like"):
        lut_check.shape_of("kws")
    with pytest.raises(ValueError, match="no index"):
        lut_check.shape_of("kws_99")
    with pytest.raises(ValueError, match="pointwise"):
        lut_check.shape_of("resnet20_0")
