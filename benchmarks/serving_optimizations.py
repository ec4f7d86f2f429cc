"""Naive serving design vs each optimization alone vs all combined (closed-loop throughput).

    python benchmarks/serving_optimizations.py --scale full
    # device machine: --accelerator cuda --tag _h100
"""

from effllm_lib.serving import experiments

if __name__ == "__main__":
    experiments.suite_main(experiments.run_optimizations_suite, experiments.OPT_SCALES, description=__doc__)
