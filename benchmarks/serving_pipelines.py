"""Two-DNN pipeline over each broker (queue, shared memory, Redis); saves the pipeline results files.

    python benchmarks/serving_pipelines.py --scale full
    python benchmarks/serving_pipelines.py --scale full --appendfsync everysec --tag _everysec
    python benchmarks/serving_pipelines.py --durability --scale full --redis-dir .   # appendfsync cost per message

``--appendfsync`` is Redis's durability setting for the pipeline run (default ``always``: an accepted crop
survives a broker crash). ``--durability`` instead measures what each setting costs a message
(put + get + complete, one client) with the append-only files under ``--redis-dir`` (put it on the disk
under test: an fsync on tmpfs costs nothing); it writes ``durability`` and ``durability_runs``.
"""

import argparse

from effllm_lib.serving import broker, experiments

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", choices=sorted(experiments.PIPELINE_SCALES), default="ci")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--appendfsync", choices=broker.APPENDFSYNC, default="always")
    ap.add_argument("--tag", default="", help="suffix of the results names, e.g. _h200")
    ap.add_argument("--durability", action="store_true", help="measure the cost of each appendfsync setting")
    ap.add_argument("--redis-dir", default=None, help="folder for the append-only files of --durability")
    ap.add_argument("--device", default="cpu", help="where both DNNs run (cpu, or cuda on the GPU machine)")
    args = ap.parse_args()
    if args.durability:
        out = experiments.run_durability_suite(args.scale, save=not args.no_save, workdir=args.redis_dir,
                                               tag=args.tag)
        print(out["summary"].round(1).to_string())
    else:
        out = experiments.run_pipeline_suite(args.scale, save=not args.no_save, appendfsync=args.appendfsync,
                                             tag=args.tag, device=args.device)
        print(out["summary"].round(2).to_string())
        print(out["claims"].to_string())
