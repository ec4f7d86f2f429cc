"""Accuracy x performance per area: which PQ settings are worth building, from trained networks and the model.

    points = pareto.points(sweeps.load_committed())      # one row per (network, N_p, L_s) trained in the grid
    points[points.on_front]                               # the Pareto front per network

Accuracy comes from the committed accuracy sweeps (the ``grid`` experiment: the same recipe at every (N_p, L_s),
mean over the seeds present); performance per area over the DLA from ``accelerator.compare_network`` at the best
hardware size of the authors' grid (NUM_OUT_VEC x NUM_SUBSPACE_VEC x memory) for that setting. The grid's
tables are float in training, so the accelerator is charged the public model's default table widths
(``accelerator.PUBLIC_PROTO_BITS`` / ``PUBLIC_LUT_BITS``), as the authors' comparison table does for settings
without named widths. ``paper_setting`` marks the (L_s, N_p) pairs of the authors' comparison table.
"""

from __future__ import annotations

import pandas as pd

from . import accelerator as A


def best_perf_per_area(network: str, subvec_len: int, n_prototypes: int, *, area_model: str = "public",
                       proto_bits: int = A.PUBLIC_PROTO_BITS, lut_bits: int = A.PUBLIC_LUT_BITS,
                       memories=("DDR", "HBM")) -> dict:
    """The highest perf/area over the authors' hardware grid for one PQ setting, with the hardware that gives it."""
    layers = A.load_layers(network)
    best = None
    for memory in memories:
        for nov in A.NUM_OUT_VEC_GRID:
            for nsv in A.NUM_SUBSPACE_VEC_GRID:
                hw = A.PQConfigHW(subvec_len=subvec_len, n_prototypes=n_prototypes, proto_bits=proto_bits,
                                  lut_bits=lut_bits, num_out_vec=nov, num_subspace_vec=nsv, memory=memory)
                res = A.compare_network(layers, hw, area_model=area_model)
                if best is None or res["perf_per_area"] > best["perf_per_area"]:
                    best = {"perf_per_area": res["perf_per_area"], "speedup": res["speedup"],
                            "num_out_vec": nov, "num_subspace_vec": nsv, "memory": memory}
    return best


def pareto_front(perf, acc) -> list[bool]:
    """For each point: is it on the front (no other point at least as good on both axes and better on one)?"""
    perf, acc = list(perf), list(acc)
    if len(perf) != len(acc):
        raise ValueError(f"perf and acc must have the same length, got {len(perf)} and {len(acc)}")
    return [not any(pj >= pi and aj >= ai and (pj > pi or aj > ai) for pj, aj in zip(perf, acc))
            for pi, ai in zip(perf, acc)]


def points(sweep: pd.DataFrame, *, mode: str = "both", area_model: str = "public") -> pd.DataFrame:
    """One row per (network, N_p, L_s) of the sweeps' ``grid`` rows in ``mode`` ("both" = fine-tuned, or
    "kmeans"): mean accuracy over seeds, the best perf/area, ``on_front`` and ``paper_setting``."""
    grid = sweep[(sweep.experiment == "grid") & (sweep["mode"] == mode)]
    if grid.empty:
        raise ValueError(f"no grid rows with mode {mode!r} in the sweep table")
    acc = (grid.groupby(["network", "n_prototypes", "subvec_len"], as_index=False)
           .agg(accuracy=("accuracy", "mean"), float_accuracy=("float_accuracy", "mean"),
                n_seeds=("accuracy", "size")))
    rows = []
    for r in acc.itertuples():
        n_p, l_s = int(r.n_prototypes), int(r.subvec_len)
        hw = best_perf_per_area(r.network, l_s, n_p, area_model=area_model)
        paper = {(c[0], c[1]) for c in A.PAPER_CONFIGS[r.network]}
        rows.append({"network": r.network, "n_prototypes": n_p, "subvec_len": l_s, "accuracy": r.accuracy,
                     "float_accuracy": r.float_accuracy, "n_seeds": r.n_seeds, "area_model": area_model,
                     **hw, "paper_setting": (l_s, n_p) in paper,
                     "main_setting": (l_s, n_p) == A.PAPER_CONFIGS[r.network][0][:2]})
    out = pd.DataFrame(rows)
    out["on_front"] = False
    for _, g in out.groupby("network"):
        out.loc[g.index, "on_front"] = pareto_front(g.perf_per_area, g.accuracy)
    return out


def e2e_points(sweep: pd.DataFrame, *, area_model: str = "public") -> pd.DataFrame:
    """The e2e recipe's rows (the paper's main setting, float tables and the paper's low-bit tables), mean over
    seeds, each with the best perf/area of its setting and table widths (float tables: the public defaults)."""
    e2e = sweep[(sweep.experiment == "e2e") & (sweep["mode"] == "e2e")]
    rows = []
    for (net, n_p, l_s), g in e2e.groupby(["network", "n_prototypes", "subvec_len"]):
        for low, h in g.groupby(g.proto_bits.notna()):
            pbits = int(h.proto_bits.iloc[0]) if low else A.PUBLIC_PROTO_BITS
            lbits = int(h.lut_bits.iloc[0]) if low else A.PUBLIC_LUT_BITS
            hw = best_perf_per_area(net, int(l_s), int(n_p), area_model=area_model, proto_bits=pbits,
                                    lut_bits=lbits)
            rows.append({"network": net, "n_prototypes": int(n_p), "subvec_len": int(l_s), "proto_bits": pbits,
                         "lut_bits": lbits, "low_bit": bool(low), "accuracy": h.accuracy.mean(),
                         "n_seeds": len(h), "area_model": area_model, **hw})
    return pd.DataFrame(rows)
