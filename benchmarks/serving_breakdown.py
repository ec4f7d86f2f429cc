"""Measure the serving chapter's latency breakdown and throughput and save the results files.

    python benchmarks/serving_breakdown.py --scale full     # what the book shows (~15 min on 2 cores)

On the device machine: ``--accelerator cuda --tag _h100 --random-weights`` (add ``--decoder nvjpeg`` for GPU
decoding). It has no internet, so carry (git-ignored folders): ``.whl`` with the cp312 manylinux wheels of
litserve 0.2.19, fastapi, starlette, pydantic, pydantic-core, annotated-types, typing-inspection,
typing-extensions, opentelemetry-api, uvicorn, httptools, websockets, watchfiles, python-dotenv, python-multipart,
pyzmq, prometheus-client and simplejpeg (`pip download --no-deps --only-binary=:all: --python-version 3.12 ...`,
~6 MB), and
``.devcache/assets/wallpapers`` (a copy of the wallpapers asset, ~27 MB); then
``pip install --no-index --no-deps --target /tmp/site .whl/*.whl`` and run with
``PYTHONPATH=/tmp/site:. EFFLLM_CACHE=.devcache EFFLLM_COMMIT=<sha>``.
"""

import argparse

from effllm_lib.serving import experiments


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--scale", choices=sorted(experiments.SCALES), default="ci")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--log", default=None, help="server log file")
    ap.add_argument("--tag", default="", help="suffix for the results names, e.g. _h100")
    ap.add_argument("--models", default=None, help="comma-separated subset of the scale's models")
    experiments.add_server_args(ap)
    args = ap.parse_args()
    server = experiments.server_overrides(args)  # --decoder pil, opencv, turbo or nvjpeg (CUDA only)
    out = experiments.run_breakdown_suite(args.scale, save=not args.no_save, log_path=args.log, server=server,
                                          tag=args.tag, models=args.models.split(",") if args.models else None)
    print(out["breakdown"].round(2).to_string())
    print(out["claims"].to_string())


if __name__ == "__main__":
    main()
