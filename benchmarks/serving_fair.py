"""The fair 2.25x: the optimized serving design vs prior-work batching servers at equal cores and workers.

    python benchmarks/serving_fair.py --scale full --suffix _cpu2 --claims   # this 2-core box (~10 min)
    # device machine (H200 host, 16 cores): servers on cores 0-7, load generator on 8-15
    python benchmarks/serving_fair.py --scale full --accelerator cuda --server-cpus 0-7 --client-cpus 8-15 \\
        --workers 2 --random-weights --suffix _h200

Writes data/results/serving/fair<suffix>.csv (per design: medians over passes, ratio to the best baseline
of the same run with the min/max of per-pass ratios, fraction of the pre-decoded-pixels ceiling) and
fair_runs<suffix>.csv (one row per design and pass). Designs and baselines: ``effllm_lib.serving.fair``.
"""

import argparse

from effllm_lib.serving import experiments, fair


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", choices=sorted(fair.SCALES), default="ci")
    ap.add_argument("--suffix", "--tag", dest="suffix", default="",
                    help="suffix of the results names naming the machine, e.g. _cpu2 or _h200")
    experiments.add_server_args(ap)
    ap.add_argument("--server-cpus", default=None, help="CPU list every server is confined to, e.g. 0-7")
    ap.add_argument("--client-cpus", default=None, help="CPU list of the load generator, e.g. 8-15")
    ap.add_argument("--workers", type=int, default=None, help="inference workers of every batching design")
    ap.add_argument("--designs", default=None, help="';'-separated subset of the designs (names hold commas)")
    ap.add_argument("--log", default=None, help="server log file")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--claims", action="store_true",
                    help="also write claims_fair (the scorecard's optimized_gain_vs_prior_work row; one machine only)")
    args = ap.parse_args(argv)
    server = experiments.server_overrides(args)
    out = fair.run(args.scale, save=not args.no_save, claims=args.claims, server=server, tag=args.suffix,
                   server_cpus=args.server_cpus, client_cpus=args.client_cpus, workers=args.workers,
                   designs=tuple(d.strip() for d in args.designs.split(";") if d.strip()) if args.designs else None, log_path=args.log)
    cols = ["design", "throughput_rps", "p50_ms", "p99_ms", "mean_batch", "ratio_of_medians", "ratio_median",
            "ratio_min", "ratio_max", "of_ceiling"]
    print(out["summary"][cols].round(3).to_string())
    print(out["claims"].to_string())
    return out


if __name__ == "__main__":
    main()
