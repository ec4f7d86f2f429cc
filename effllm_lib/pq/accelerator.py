"""The analytical PQA cycle and area model, and the DLA baseline it is compared with.

A re-implementation (not a copy) of the equations in the authors' public model (abdelfattah-lab/PQA,
``analytical_model/model.py``), with the settings their comparison table uses: both accelerators clocked at
300 MHz, table loading overlapped with compute, true dual-port M20Ks, L2 distances on DSPs, DDR or HBM.

PQA, per layer (im2col view, N_s = ceil(Cin*Kh*Kw / L_s) subspaces, one input column per output pixel)::

    compute = columns * ceil(N_s / NUM_SUBSPACE_VEC)
                      * max(ceil(L_s / PROTO_LENGTH_VEC) * ceil(N_p / NUM_PROTO_VEC), ceil(Cout / NUM_OUT_VEC))
    load    = max(LUT entries / (NUM_OUT_VEC * NUM_SUBSPACE_VEC), table bits / memory bits per cycle)
    cycles  = max(load, compute)

Area is in CLB-equivalents (an M20K counts as 4, a DSP as 3); the PQA's CLB count is the authors' linear fit
over synthesized configurations. The DLA baseline (an OpenCL DLA-style engine, Cvec 8, Kvec 48, Qvec 4, Wvec 6,
Svec 3) takes ``ceil(K/Kvec) * P * ceil(Q/Qvec) * (FW/Svec) * FH * ceil(C/Cvec)`` cycles and 27,360 units.

Performance per area of PQA over the DLA = (DLA cycles * DLA area) / (PQA cycles * PQA area), same clock.

Two area variants sit beside the public model (``area_model``):

* ``"public"``: the authors' model, one DSP per distance multiplier, NUM_OUT_VEC x NUM_SUBSPACE_VEC x
  PROTO_LENGTH_VEC of them.
* ``"kernel"``: DSPs counted as the authors' OpenCL kernel (``hardware/device/pq_basic.cl``) unrolls its distance
  loop: N_S_VEC x N_P_VEC x L_S_VEC multipliers (NUM_SUBSPACE_VEC x NUM_PROTO_VEC x PROTO_LENGTH_VEC here). The
  lookup side of that kernel reads NUM_OUT_VEC x NUM_SUBSPACE_VEC LUT banks per cycle, as the public model's
  M20K count says, but it has no multiplier per output channel.
* ``"kernel_logic"``: the kernel's count, except that at prototype widths of 2-6 bits (the paper's "no DSPs"
  range) every distance unit is built from logic; its cost is ``distance_unit_clbs`` (our estimate, below).

Cycles are the public model's in all three; only the area changes.

Quirks of the public model kept on purpose (so our numbers match theirs), each flagged where it happens:
the DLA's ``FW/Svec`` is a real division (a 1x1 layer gets a third of a cycle per output row), its output
size is ``H/stride`` without padding arithmetic, the PQA's DSP count scales with NUM_OUT_VEC (not with the
number of prototypes compared), and table bit widths change only the loading time, never the area.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from itertools import product

import pandas as pd

from ..paths import data_dir

FREQUENCY_HZ = 300e6
MEMORY_BITS_PER_S = {"DDR": 35.2 * 8e9, "HBM": 400 * 8e9}
MEMORY_EFFICIENCY = 0.8
M20K_CLBS, DSP_CLBS = 4, 3
NETWORKS = ("resnet20", "kws", "emnist")

# The public model's default table widths (simulate_layer: PROTO_TABLE_ENTRY = 8, PQ_TABLE_ENTRY = 16), which its
# comparison table uses wherever a setting names no widths.
PUBLIC_PROTO_BITS, PUBLIC_LUT_BITS = 8, 16
_D = (PUBLIC_PROTO_BITS, PUBLIC_LUT_BITS)
# The (L_s, N_p, prototype bits, LUT bits) settings the authors' comparison table evaluates per network
# (analytical_model/print_comparison_table.ipynb). The first entry of each is the paper's main accuracy setting.
PAPER_CONFIGS = {
    "resnet20": [(9, 16, *_D), (3, 64, *_D), (9, 64, *_D), (9, 8, *_D), (9, 8, 6, 5), (9, 16, 6, 5)],
    "kws": [(4, 16, *_D), (8, 8, *_D), (8, 8, 2, 6), (4, 16, 2, 6)],
    "emnist": [(4, 12, *_D), (8, 8, *_D), (8, 8, 5, 5), (4, 12, 5, 5)],
}
AREA_MODELS = ("public", "kernel", "kernel_logic")
LOGIC_MAX_BITS = 6  # the paper's "2-6-bit PQ needs no DSPs"
# Our logic-cost assumptions for a distance unit (Intel ALMs; a CLB-equivalent is a 10-ALM LAB, the unit the
# public model's M20K = 4 / DSP = 3 ratios are given in): an adder/subtractor takes one ALM per 2 bits (carry
# chain), a function of up to 6 inputs one ALM (6-LUT), of 7-8 inputs four (a 4:1 mux of 6-LUTs).
ALMS_PER_CLB = 10
# The hardware grid of the authors' comparison table (PROTO_LENGTH_VEC and NUM_PROTO_VEC follow the layer).
NUM_OUT_VEC_GRID = (32, 64)
NUM_SUBSPACE_VEC_GRID = (16, 32, 64)


@dataclass(frozen=True)
class Layer:
    """A conv (or linear: kernel 1, 1x1 map) layer; in_h/in_w are the input map size."""
    in_ch: int
    in_h: int
    in_w: int
    out_ch: int
    kernel: int = 1
    stride: int = 1

    def __post_init__(self):
        for name in ("in_ch", "in_h", "in_w", "out_ch", "kernel", "stride"):
            value = getattr(self, name)
            if not isinstance(value, (int,)) or value < 1:
                raise ValueError(f"Layer.{name} must be a positive int, got {value!r}")

    @property
    def columns(self) -> float:
        # public model: output pixels = H*W/stride^2 (no padding arithmetic; exact for the tables here)
        return self.in_h * self.in_w / self.stride**2


@dataclass(frozen=True)
class PQConfigHW:
    """A PQA instance: the layer's PQ setting (L_s, N_p, table widths) and the hardware vector sizes."""
    subvec_len: int = 9            # L_s
    n_prototypes: int = 16         # N_p
    proto_bits: int = PUBLIC_PROTO_BITS  # prototype table entry width
    lut_bits: int = PUBLIC_LUT_BITS      # LUT (PQ table) entry width
    num_out_vec: int = 32          # NUM_OUT_VEC: output channels looked up per cycle
    num_subspace_vec: int = 16     # NUM_SUBSPACE_VEC: subspaces processed in parallel
    proto_length_vec: int | None = None  # PROTO_LENGTH_VEC; None = min(16, L_s)
    num_proto_vec: int | None = None     # NUM_PROTO_VEC; None = min(16, N_p)
    memory: str = "DDR"

    def __post_init__(self):
        if self.memory not in MEMORY_BITS_PER_S:
            raise ValueError(f"memory must be one of {sorted(MEMORY_BITS_PER_S)}, got {self.memory!r}")
        for name in ("subvec_len", "n_prototypes", "proto_bits", "lut_bits", "num_out_vec", "num_subspace_vec"):
            if getattr(self, name) < 1:
                raise ValueError(f"PQConfigHW.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def plv(self) -> int:
        return self.proto_length_vec or min(16, self.subvec_len)

    @property
    def npv(self) -> int:
        return self.num_proto_vec or min(16, self.n_prototypes)


@dataclass(frozen=True)
class DLAConfig:
    cvec: int = 8
    kvec: int = 48
    qvec: int = 4
    wvec: int = 6
    svec: int = 3
    weight_bits: int = 16
    extra_clbs_per_kvec: float = 330.0  # (3.3e3)//10 in the public model
    memory: str = "DDR"


def memory_bits_per_cycle(memory: str) -> int:
    return math.ceil(MEMORY_BITS_PER_S[memory] * MEMORY_EFFICIENCY / FREQUENCY_HZ)


# --------------------------------------------------------------------------------------------------- PQA
def pqa_layer(layer: Layer, hw: PQConfigHW) -> dict:
    """Cycles of one layer on PQA: loading, the two compute stages, and the total."""
    n_sub = math.ceil(layer.in_ch * layer.kernel**2 / hw.subvec_len)
    proto_stage = math.ceil(hw.subvec_len / hw.plv) * math.ceil(hw.n_prototypes / hw.npv)
    lut_stage = math.ceil(layer.out_ch / hw.num_out_vec)
    compute = layer.columns * max(proto_stage, lut_stage) * math.ceil(n_sub / hw.num_subspace_vec)
    lut_entries = n_sub * layer.out_ch * hw.n_prototypes
    proto_entries = n_sub * hw.n_prototypes * hw.subvec_len
    table_bits = proto_entries * hw.proto_bits + lut_entries * hw.lut_bits
    load = max(1, math.ceil(lut_entries / (hw.num_out_vec * hw.num_subspace_vec)),
               math.ceil(table_bits / memory_bits_per_cycle(hw.memory)))
    return {"n_subspaces": n_sub, "proto_stage": proto_stage, "lut_stage": lut_stage, "load_cycles": load,
            "compute_cycles": compute, "cycles": max(load, compute), "lut_entries": lut_entries,
            "table_bits": table_bits, "bound": "memory" if load > compute else "compute"}


def distance_unit_clbs(bits: int, length: int) -> float:
    """Logic area (CLB-equivalents) of one squared-L2 distance unit over ``length`` ``bits``-bit elements.

    Per element: a (bits+1)-bit subtractor, then a squarer of the (bits+1)-bit difference as a truth table
    (|d| needs ``bits`` bits; each of its 2*bits output bits is one function of those inputs); then an adder tree
    over the ``length`` squares, each adder as wide as its sum. Our estimate from the rules above, not synthesis.
    """
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"a logic distance unit is modelled for 1..8-bit elements, got {bits!r}")
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    sub = math.ceil((bits + 1) / 2)
    alms_per_output = 1 if bits <= 6 else 4
    square = 2 * bits * alms_per_output
    tree, width, n = 0, 2 * bits, length
    while n > 1:  # pairwise adder tree, one bit wider per level
        width += 1
        tree += (n // 2) * math.ceil(width / 2)
        n = n - n // 2
    return (length * (sub + square) + tree) / ALMS_PER_CLB


def pqa_area(hw: PQConfigHW, *, l2_on_dsps: bool = True, multipliers_per_dsp: float = 1.0,
             area_model: str = "public") -> dict:
    """Area of a PQA instance in CLB-equivalents (M20K = 4, DSP = 3, plus the fitted CLB count).

    ``area_model``: "public", "kernel" or "kernel_logic" (module docstring). ``multipliers_per_dsp`` > 1 packs
    several narrow distance multipliers into one DSP (our what-if, not in the public model);
    ``l2_on_dsps=False`` drops the DSPs and models no logic in their place (the optimistic bound).
    """
    if multipliers_per_dsp <= 0:
        raise ValueError(f"multipliers_per_dsp must be > 0, got {multipliers_per_dsp}")
    if area_model not in AREA_MODELS:
        raise ValueError(f"area_model must be one of {AREA_MODELS}, got {area_model!r}")
    if area_model == "public":
        multipliers = hw.num_out_vec * hw.num_subspace_vec * hw.plv  # public model's DSP count
    else:  # the OpenCL kernel's unrolled distance loop: N_S_VEC x N_P_VEC x L_S_VEC
        multipliers = hw.num_subspace_vec * hw.npv * hw.plv
    logic_units = area_model == "kernel_logic" and hw.proto_bits <= LOGIC_MAX_BITS
    dsps = math.ceil(multipliers / multipliers_per_dsp) if l2_on_dsps and not logic_units else 0
    logic_clbs = hw.num_subspace_vec * hw.npv * distance_unit_clbs(hw.proto_bits, hw.plv) if logic_units else 0.0
    m20ks = math.ceil(hw.num_subspace_vec * hw.num_out_vec / 2) * 2  # dual-port banks, 2 ports (overlap)
    clbs = (54.0152229 * hw.num_out_vec + 197.18071766 * hw.num_subspace_vec + 59.99415826 * hw.plv
            + 54.0152229 * hw.npv - 1248.8141835982537) + logic_clbs
    return {"dsps": dsps, "m20ks": m20ks, "clbs": clbs, "logic_distance_clbs": logic_clbs,
            "area": dsps * DSP_CLBS + m20ks * M20K_CLBS + clbs}


# --------------------------------------------------------------------------------------------------- DLA
def dla_layer(layer: Layer, dla: DLAConfig = DLAConfig()) -> dict:
    p = layer.in_h / layer.stride  # public model: output height = H/stride (float)
    q = layer.in_w / layer.stride
    k, c, f = layer.out_ch, layer.in_ch, layer.kernel
    # (f / svec) is a real division in the public model: a 1x1 layer costs a third of a row cycle
    compute = math.floor(math.ceil(k / dla.kvec) * (p * math.ceil(q / dla.qvec)) * (f / dla.svec) * f
                         * math.ceil(c / dla.cvec))
    load = math.ceil(k * f * f * c * dla.weight_bits / memory_bits_per_cycle(dla.memory))
    return {"load_cycles": load, "compute_cycles": compute, "cycles": max(load, compute)}


def dla_area(dla: DLAConfig = DLAConfig()) -> dict:
    dsps = (dla.wvec - dla.qvec + 1) * dla.qvec * dla.kvec * dla.cvec * 0.5
    m20ks = dla.wvec * dla.cvec * dla.kvec / 2
    clbs = dla.extra_clbs_per_kvec * dla.kvec
    return {"dsps": dsps, "m20ks": m20ks, "clbs": clbs, "area": dsps * DSP_CLBS + m20ks * M20K_CLBS + clbs}


# ------------------------------------------------------------------------------------------------ networks
def load_layers(network: str) -> list[Layer]:
    """The PQ layers of a network from data/pqa/<network>.csv (shapes from the authors' public model)."""
    path = data_dir() / "pqa" / f"{network}.csv"
    if not path.is_file():
        raise ValueError(f"unknown network {network!r}: {path} not found (have {', '.join(NETWORKS)})")
    df = pd.read_csv(path)
    return [Layer(int(r.in_ch), int(r.in_h), int(r.in_w), int(r.out_ch), int(r.kernel), int(r.stride))
            for r in df.itertuples()]


def compare_network(layers: list[Layer], hw: PQConfigHW, dla: DLAConfig | None = None,
                    *, l2_on_dsps: bool = True, multipliers_per_dsp: float = 1.0, area_model: str = "public") -> dict:
    """Total cycles on PQA and DLA and PQA's performance per area relative to the DLA."""
    if not layers:
        raise ValueError("compare_network needs at least one layer")
    dla = dla or DLAConfig(memory=hw.memory)
    pq = [pqa_layer(layer, hw) for layer in layers]
    base = [dla_layer(layer, dla) for layer in layers]
    pq_cycles, dla_cycles = sum(r["cycles"] for r in pq), sum(r["cycles"] for r in base)
    pq_area = pqa_area(hw, l2_on_dsps=l2_on_dsps, multipliers_per_dsp=multipliers_per_dsp,
                       area_model=area_model)["area"]
    base_area = dla_area(dla)["area"]
    return {"pqa_cycles": pq_cycles, "dla_cycles": dla_cycles, "speedup": dla_cycles / pq_cycles,
            "pqa_area": pq_area, "dla_area": base_area,
            "perf_per_area": (dla_cycles * base_area) / (pq_cycles * pq_area),
            "memory_bound_layers": sum(r["bound"] == "memory" for r in pq)}


def sweep(networks=NETWORKS, configs: dict | None = None, memories=("DDR", "HBM"),
          num_out_vecs=NUM_OUT_VEC_GRID, num_subspace_vecs=NUM_SUBSPACE_VEC_GRID,
          *, l2_on_dsps: bool = True, multipliers_per_dsp: float = 1.0, area_model: str = "public") -> pd.DataFrame:
    """The authors' comparison grid: every network x PQ setting x hardware size x memory, one row each."""
    configs = configs or PAPER_CONFIGS
    rows = []
    for net in networks:
        layers = load_layers(net)
        for (ls, n_p, pbits, lbits), memory, nov, nsv in product(configs[net], memories, num_out_vecs,
                                                                 num_subspace_vecs):
            hw = PQConfigHW(subvec_len=ls, n_prototypes=n_p, proto_bits=pbits, lut_bits=lbits,
                            num_out_vec=nov, num_subspace_vec=nsv, memory=memory)
            res = compare_network(layers, hw, l2_on_dsps=l2_on_dsps, multipliers_per_dsp=multipliers_per_dsp,
                                  area_model=area_model)
            rows.append({"network": net, "area_model": area_model, **{k: v for k, v in asdict(hw).items()
                                            if k not in ("proto_length_vec", "num_proto_vec")},
                         "proto_length_vec": hw.plv, "num_proto_vec": hw.npv, **res})
    return pd.DataFrame(rows)


def sweep_area_models(area_models=AREA_MODELS, **kw) -> pd.DataFrame:
    """``sweep`` once per area model, stacked (column ``area_model``)."""
    return pd.concat([sweep(area_model=m, **kw) for m in area_models], ignore_index=True)


def best_per_network(df: pd.DataFrame) -> pd.DataFrame:
    """The row with the highest performance per area for each network."""
    idx = df.groupby("network")["perf_per_area"].idxmax()
    return df.loc[idx].set_index("network").reindex([n for n in NETWORKS if n in set(df.network)]).reset_index()


def hw_of(row) -> PQConfigHW:
    """The PQConfigHW of a ``sweep`` row."""
    return PQConfigHW(subvec_len=int(row.subvec_len), n_prototypes=int(row.n_prototypes),
                      proto_bits=int(row.proto_bits), lut_bits=int(row.lut_bits), num_out_vec=int(row.num_out_vec),
                      num_subspace_vec=int(row.num_subspace_vec), memory=row.memory)


def multipliers_per_dsp_for(target: float, network: str, hw: PQConfigHW) -> float:
    """How many distance multipliers each DSP would have to carry for ``hw`` to reach ``target`` perf/area.

    Perf/area is inverse in area and only the DSP term changes, so this solves a linear equation.
    Returns inf when even a DSP-free design falls short.
    """
    layers = load_layers(network)
    base = compare_network(layers, hw)
    area = pqa_area(hw)
    needed_area = base["perf_per_area"] * area["area"] / target
    dsp_area = needed_area - area["m20ks"] * M20K_CLBS - area["clbs"]
    return math.inf if dsp_area <= 0 else area["dsps"] * DSP_CLBS / dsp_area


def with_hw(hw: PQConfigHW, **changes) -> PQConfigHW:
    return replace(hw, **changes)
