"""Time the PQ LUT kernel (effllm_lib.pq.lut_kernel) against dense F.conv2d / F.linear on the same shapes.

    .venv/bin/python benchmarks/pq_lut.py [--scale ci|full] [--tag xeon] [--threads N] [--repeats R] [--claims]

Shapes: the paper's pointwise networks (EMNIST's ten and KWS's five 1x1 layers, data/pqa/*.csv), the 1x1 layers
of a ResNet-50 bottleneck at each stage (channel expansion / reduction) and transformer-sized linear layers.
Per shape: N_p 16, L_s 4 (L_s 8 as well at full scale), prototypes from k-means on the layer's input (|N(0,1)|,
post-ReLU-like: kernel speed does not depend on the values, accuracy does and is reported separately by the
chapter), both encoders (exact nearest prototype, MADDNESS hash tree). Times are the median of ``repeats`` runs
with the 25th/75th percentiles; ratios are against dense measured in the same run, and each time is set against
its memory floor (bytes moved / the copy bandwidth measured at the start). Writes
data/results/pqa/lut_benchmark[_<tag>].csv (and with --claims the scorecard row file lut_claims.csv).
"""
import argparse
import copy
import statistics
import time

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from effllm_lib import results
from effllm_lib.pq import PQConfig, PQConv2d, PQLinear, kmeans
from effllm_lib.pq import accelerator as A
from effllm_lib.pq import lut_kernel as L

# (name, Cin, Cout, H*W-or-tokens, is_conv): ResNet-50 1x1 layers per stage (reduce, expand) and BERT-base FFN
RESNET50_1X1 = [("r50_s1_reduce", 256, 64, 56), ("r50_s1_expand", 64, 256, 56), ("r50_s2_reduce", 512, 128, 28),
                ("r50_s2_expand", 128, 512, 28), ("r50_s3_reduce", 1024, 256, 14), ("r50_s3_expand", 256, 1024, 14),
                ("r50_s4_reduce", 2048, 512, 7), ("r50_s4_expand", 512, 2048, 7)]
LINEAR = [("ffn_up_768x3072", 768, 3072), ("ffn_down_3072x768", 3072, 768), ("proj_768x768", 768, 768)]


def percentiles(fn, repeats):
    fn()  # warm-up (also builds the extension on the first call)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return statistics.median(times), q[0], q[2]


def copy_bandwidth(n_bytes=1 << 28, repeats=5):
    """Bytes per second of a large tensor copy (read + write), the memory floor's denominator."""
    src = torch.ones(n_bytes // 4)
    dst = torch.empty_like(src)
    t, _, _ = percentiles(lambda: dst.copy_(src), repeats)
    return 2 * n_bytes / t


def shapes(scale):
    out = []
    for net in ("kws", "emnist"):
        out += [(f"{net}_{i}", l.in_ch, l.out_ch, (l.in_h, l.in_w), True) for i, l in enumerate(A.load_layers(net))]
    out += [(n, cin, cout, (hw, hw), True) for n, cin, cout, hw in RESNET50_1X1]
    out += [(n, cin, cout, None, False) for n, cin, cout in LINEAR]
    if scale == "ci":
        out = [s for s in out if s[0] in ("kws_0", "emnist_4", "r50_s2_expand", "r50_s3_expand", "ffn_up_768x3072")]
    return out


def build(cin, cout, conv, l_s, x, seed):
    dense = (nn.Conv2d(cin, cout, 1) if conv else nn.Linear(cin, cout)).eval()
    cfg = PQConfig(n_prototypes=16, subvec_len=l_s)
    layer = (PQConv2d if conv else PQLinear).from_dense(dense, cfg).eval()
    rows = layer.rows(x[:8] if conv else x[:4096])[:4096]
    sub = F.pad(rows, (0, layer.pad)).view(len(rows), layer.n_subspaces, l_s).transpose(0, 1)
    layer.set_prototypes(kmeans(sub, 16, iters=10, seed=seed))
    return dense, layer, rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", default="ci", choices=["ci", "full"])
    ap.add_argument("--tag", default="", help="machine tag appended to the results name (e.g. xeon)")
    ap.add_argument("--batch", type=int, default=None, help="images per conv call (default 4 ci, 32 full)")
    ap.add_argument("--tokens", type=int, default=None, help="rows per linear call (default 512 ci, 4096 full)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 5 ci, 21 full)")
    ap.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's)")
    ap.add_argument("--kernel", default="auto", help="LUT kernel: auto or one of " + ", ".join(L.KERNELS))
    ap.add_argument("--claims", action="store_true", help="also write the scorecard row file lut_claims")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch or (4 if args.scale == "ci" else 32)
    tokens = args.tokens or (512 if args.scale == "ci" else 4096)
    repeats = args.repeats or (5 if args.scale == "ci" else 21)
    sub_lens = (4,) if args.scale == "ci" else (4, 8)
    kernel = L.resolve_kernel(args.kernel)
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"kernel {kernel} (available {L.available_kernels()}), {torch.get_num_threads()} threads, "
          f"copy bandwidth {bw / 1e9:.1f} GB/s")
    rows_out = []
    params = {"batch": batch, "tokens": tokens, "repeats": repeats, "threads": torch.get_num_threads(),
              "kernel": kernel, "available_kernels": L.available_kernels(), "n_prototypes": 16,
              "sub_lens": list(sub_lens), "copy_bandwidth_gbs": bw / 1e9, "tag": args.tag}
    name = "lut_benchmark" + (f"_{args.tag}" if args.tag else "")
    for shape, cin, cout, hw, conv in shapes(args.scale):
        x = (torch.randn(batch, cin, *hw) if conv else torch.randn(tokens, cin)).abs()
        m = batch * hw[0] * hw[1] if conv else tokens
        for l_s in sub_lens:
            dense, layer, calib = build(cin, cout, conv, l_s, x, seed=0)
            w, b = dense.weight.detach(), dense.bias.detach()
            with torch.no_grad():
                ref_dense = F.conv2d(x, w, b) if conv else F.linear(x, w, b)
                t_dense = percentiles(lambda: F.conv2d(x, w, b) if conv else F.linear(x, w, b), repeats)
            dense_bytes = 4 * (x.numel() + w.numel() + ref_dense.numel())
            kmeans_layer = layer
            for encoder in ("exact", "tree"):
                tree, layer = None, kmeans_layer
                if encoder == "tree":
                    layer = copy.deepcopy(kmeans_layer)
                    tree = L.fit_hash_tree(layer, calib[:2048])
                    layer.set_prototypes(tree.prototypes)
                kern = L.PQLutKernel(layer, tree=tree, kernel=kernel)
                out = torch.empty(ref_dense.shape)
                t_lut = percentiles(lambda: kern(x, out=out), repeats)
                with torch.no_grad():
                    ref_pq = layer(x[:1] if conv else x[:256])
                got = out[:1] if conv else out[:256]
                lut_bytes = 4 * (x.numel() + out.numel()) + kern.tables.numel() + kern.s4 * m
                rows_out.append({
                    "shape": shape, "kind": "conv1x1" if conv else "linear", "in_features": cin,
                    "out_features": cout, "rows": m, "subvec_len": l_s, "encoder": encoder, "kernel": kernel,
                    "dense_ms": 1e3 * t_dense[0], "dense_p25_ms": 1e3 * t_dense[1], "dense_p75_ms": 1e3 * t_dense[2],
                    "lut_ms": 1e3 * t_lut[0], "lut_p25_ms": 1e3 * t_lut[1], "lut_p75_ms": 1e3 * t_lut[2],
                    "speedup": t_dense[0] / t_lut[0],
                    "dense_memory_floor_ms": 1e3 * dense_bytes / bw, "lut_memory_floor_ms": 1e3 * lut_bytes / bw,
                    "dense_gflops": 2 * m * cin * cout / t_dense[0] / 1e9,
                    # int8 tables vs the float PQ layer (kernel error), and PQ vs dense (the method's error)
                    "rel_err_vs_float_pq": float((got - ref_pq).norm() / ref_pq.norm()),
                    "rel_err_vs_dense": float((out - ref_dense).norm() / ref_dense.norm()),
                })
                r = rows_out[-1]
                print(f"{shape:22s} L_s {l_s} {encoder:5s} dense {r['dense_ms']:8.3f} ms  lut {r['lut_ms']:8.3f} ms "
                      f"({r['speedup']:.2f}x)  err vs PQ {r['rel_err_vs_float_pq']:.4f}", flush=True)
        # after every shape, so a run stopped by a time limit keeps what it measured
        results.save(pd.DataFrame(rows_out), "pqa", name, params={**params, "partial": True}, scale=args.scale)
    df = pd.DataFrame(rows_out)
    results.save(df, "pqa", name, params=params, scale=args.scale)
    pointwise = df[(df.kind == "conv1x1") & (df.encoder == "exact") & (df.subvec_len == 4)]
    geo = float(torch.tensor(pointwise.speedup.tolist()).log().mean().exp())
    print(f"geometric-mean speedup over dense, pointwise layers, exact encoder, L_s 4: {geo:.2f}x "
          f"({(pointwise.speedup >= 2).sum()} of {len(pointwise)} shapes at >= 2x)")
    if args.claims:
        claim = pd.DataFrame([{"claim_id": "cpu_lut_pointwise_speedup", "ours": geo, "status": "measured",
                               "reason": f"geometric-mean speedup of the int8 LUT kernel ({kernel}, exact encoder, "
                                         f"N_p 16, L_s 4) over dense F.conv2d on {len(pointwise)} pointwise "
                                         f"layer shapes, {torch.get_num_threads()} threads"}])
        results.save(claim, "pqa", "lut_claims", params=params, scale=args.scale)


if __name__ == "__main__":
    main()
