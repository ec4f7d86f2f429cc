"""Size-aware routing on a mixed small/large workload: one pool vs two pools round-robin vs two pools routed
by image size (closed loop, throughput and p50/p99 overall and for the small requests).

    python benchmarks/serving_routing.py --scale full
    # device machine: --accelerator cuda --tag _h100
"""

import argparse

from effllm_lib.serving import experiments

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", choices=sorted(experiments.ROUTING_SCALES), default="ci")
    ap.add_argument("--accelerator", default=None, help="cpu or cuda")
    ap.add_argument("--tag", default="")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    server = {"accelerator": args.accelerator} if args.accelerator else None
    out = experiments.run_routing_suite(args.scale, save=not args.no_save, server=server, tag=args.tag)
    print(out["summary"].round(2).to_string())
