"""The analytical PQA/DLA model against hand-computed cycles and the published/derived figures."""
import pytest

from effllm_lib.pq import accelerator as A


def test_dla_area_is_the_published_27360_units():
    assert A.dla_area()["area"] == 27360  # papers.md: DLA area 27,360 units


def test_hand_computed_resnet20_first_layer():
    layer = A.Layer(16, 32, 32, 16, kernel=3, stride=1)
    hw = A.PQConfigHW(subvec_len=9, n_prototypes=16, num_out_vec=32, num_subspace_vec=16)
    pq = A.pqa_layer(layer, hw)
    # N_s = 144/9 = 16; per column max(ceil(9/9)*ceil(16/16), ceil(16/32)) = 1; 1 subspace group; 1024 columns
    assert pq["n_subspaces"] == 16 and pq["compute_cycles"] == 1024
    # load: LUT 16*16*16 = 4096 entries / (32*16) = 8; bits 16*16*9*8 (8-bit prototypes, the public model's
    # default) + 4096*16 = 83968 / 751 per cycle -> 112
    assert pq["load_cycles"] == 112 and pq["cycles"] == 1024
    # DLA: ceil(16/48) * 32 * ceil(32/4) * (3/3) * 3 * ceil(16/8) = 1536
    assert A.dla_layer(layer)["cycles"] == 1536
    # area: 32*16*9 DSPs * 3 + 512 M20K * 4 + fitted CLBs
    area = A.pqa_area(hw)
    assert area["dsps"] == 4608 and area["m20ks"] == 512
    assert area["area"] == pytest.approx(4608 * 3 + 512 * 4 + 54.0152229 * 48 + 197.18071766 * 16
                                         + 59.99415826 * 9 - 1248.8141835982537)


@pytest.mark.parametrize("network, derived", [("resnet20", 2.0), ("emnist", 3.18), ("kws", 1.1)])
def test_best_perf_per_area_matches_the_derived_public_model_values(network, derived):
    best = A.best_per_network(A.sweep(networks=(network,)))
    assert best.perf_per_area.iloc[0] == pytest.approx(derived, rel=0.02)


def test_more_parallel_lookups_cut_compute_cycles():
    layer = A.Layer(64, 8, 8, 64, 3, 1)
    slow = A.pqa_layer(layer, A.PQConfigHW(num_out_vec=16, num_subspace_vec=16))
    fast = A.pqa_layer(layer, A.PQConfigHW(num_out_vec=64, num_subspace_vec=64))
    assert fast["compute_cycles"] < slow["compute_cycles"] and fast["cycles"] <= slow["cycles"]


def test_bad_inputs():
    with pytest.raises(ValueError, match="in_ch"):
        A.Layer(0, 8, 8, 8)
    with pytest.raises(ValueError, match="memory"):
        A.PQConfigHW(memory="SRAM")
    with pytest.raises(ValueError, match="unknown network"):
        A.load_layers("vgg")
    with pytest.raises(ValueError, match="at least one layer"):
        A.compare_network([], A.PQConfigHW())


def test_default_table_widths_are_the_public_models():
    # simulate_layer defaults: PROTO_TABLE_ENTRY = 8, PQ_TABLE_ENTRY = 16, used where a setting names no widths
    assert (A.PQConfigHW().proto_bits, A.PQConfigHW().lut_bits) == (8, 16)
    assert (9, 16, 8, 16) in A.PAPER_CONFIGS["resnet20"] and (9, 8, 6, 5) in A.PAPER_CONFIGS["resnet20"]


def test_kernel_area_counts_the_unrolled_distance_loop():
    hw = A.PQConfigHW(subvec_len=9, n_prototypes=8, proto_bits=6, lut_bits=5, num_out_vec=32, num_subspace_vec=16)
    public, kernel = A.pqa_area(hw), A.pqa_area(hw, area_model="kernel")
    assert public["dsps"] == 32 * 16 * 9            # NUM_OUT_VEC x NUM_SUBSPACE_VEC x PROTO_LENGTH_VEC
    assert kernel["dsps"] == 16 * 8 * 9             # N_S_VEC x N_P_VEC x L_S_VEC
    assert kernel["m20ks"] == public["m20ks"] and kernel["clbs"] == public["clbs"]
    assert public["area"] - kernel["area"] == pytest.approx((32 - 8) * 16 * 9 * A.DSP_CLBS)
    logic = A.pqa_area(hw, area_model="kernel_logic")  # 6-bit prototypes: distance units from logic
    assert logic["dsps"] == 0 and logic["logic_distance_clbs"] == 16 * 8 * A.distance_unit_clbs(6, 9)
    wide = A.pqa_area(A.with_hw(hw, proto_bits=8), area_model="kernel_logic")  # above 6 bits: DSPs again
    assert wide["dsps"] == kernel["dsps"] and wide["logic_distance_clbs"] == 0


def test_logic_distance_unit_hand_computed():
    # 2-bit elements, length 9: per element a 3-bit subtractor (2 ALMs) + a squarer of 4 output bits (4 ALMs);
    # adder tree 9 -> 5 -> 3 -> 2 -> 1 with widths 5, 6, 7, 8: 4*3 + 2*3 + 1*4 + 1*4 = 26 ALMs; 80 ALMs = 8 CLBs
    assert A.distance_unit_clbs(2, 9) == pytest.approx(8.0)
    costs = [A.distance_unit_clbs(b, 9) for b in range(2, 9)]
    assert costs == sorted(costs)  # wider elements never cost less logic
    with pytest.raises(ValueError, match="1..8-bit"):
        A.distance_unit_clbs(16, 9)
    with pytest.raises(ValueError, match="area_model"):
        A.pqa_area(A.PQConfigHW(), area_model="asic")


def test_kernel_variants_never_lose_to_the_public_area():
    df = A.sweep_area_models(networks=("resnet20",))
    ppa = df.pivot_table(index=["subvec_len", "n_prototypes", "proto_bits", "num_out_vec", "num_subspace_vec",
                                "memory"], columns="area_model", values="perf_per_area")
    # NUM_PROTO_VEC <= 16 <= 2 x NUM_OUT_VEC on this grid, so the kernel never has more multipliers
    assert (ppa["kernel"] >= ppa["public"] - 1e-12).all()
