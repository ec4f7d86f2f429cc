"""Size-aware routing on a mixed small/large workload: one pool vs two pools round-robin vs two pools routed
by image size (closed loop, throughput and p50/p99 overall and for the small requests).

    python benchmarks/serving_routing.py --scale full
    # device machine: --accelerator cuda --tag _h100
"""

from effllm_lib.serving import experiments

if __name__ == "__main__":
    experiments.suite_main(experiments.run_routing_suite, experiments.ROUTING_SCALES, description=__doc__)
