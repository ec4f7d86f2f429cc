"""Per-stage breakdown under load: a dynamic-batching server at saturation, per decoder and image size.

    python benchmarks/serving_loaded_breakdown.py --scale full --suffix _cpu2
    # device machine: decoders pil, turbo, nvjpeg (GPU, per request) and "nvjpeg, batched" (one call per batch)
    python benchmarks/serving_loaded_breakdown.py --scale full --accelerator cuda --random-weights --suffix _h200

Writes data/results/serving/breakdown_loaded<suffix>.csv (stage medians and shares, throughput),
breakdown_loaded_requests<suffix>.csv (every request's spans) and breakdown_loaded_throughput<suffix>.csv.
"""

import argparse

from effllm_lib.serving import experiments, loaded


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", choices=sorted(loaded.SCALES), default="ci")
    ap.add_argument("--suffix", "--tag", dest="suffix", default="", help="suffix of the results names, e.g. _h200")
    experiments.add_server_args(ap)
    ap.add_argument("--decoders", default=None,
                    help="';'-separated labels of loaded.DECODE_DESIGNS, e.g. 'pil;turbo;nvjpeg;nvjpeg, batched'")
    ap.add_argument("--log", default=None, help="server log file")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    server = experiments.server_overrides(args)
    out = loaded.run(args.scale, save=not args.no_save, server=server, tag=args.suffix,
                     decoders=tuple(d.strip() for d in args.decoders.split(";") if d.strip()) if args.decoders else None, log_path=args.log)
    cols = ["decoder", "size", "throughput_rps", "mean_batch", "total_ms", "queue_ms", "decode_ms", "resize_ms",
            "inference_ms", "preprocess_share"]
    print(out["breakdown"][cols].round(2).to_string())
    return out


if __name__ == "__main__":
    main()
