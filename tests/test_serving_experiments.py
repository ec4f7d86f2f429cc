"""The serving benchmarks' shared command line (the suites themselves run in the notebooks and benchmarks)."""

import pandas as pd
import pytest

from effllm_lib.serving import experiments


def test_suite_main_passes_the_options_and_checks_them(capsys):
    calls = []

    def fake(scale, *, save, server, tag):
        calls.append((scale, save, server, tag))
        return {"summary": pd.DataFrame({"design": ["naive"], "speedup": [1.0]})}

    experiments.suite_main(fake, {"ci": {}, "full": {}}, ["--scale", "full", "--accelerator", "cuda", "--tag", "_h100"])
    experiments.suite_main(fake, {"ci": {}, "full": {}}, ["--no-save"])
    experiments.suite_main(fake, {"ci": {}, "full": {}}, ["--lenient-jpeg"])
    assert calls == [("full", True, {"accelerator": "cuda"}, "_h100"), ("ci", False, None, ""),
                     ("ci", True, {"strict_jpeg": False}, "")]
    assert "naive" in capsys.readouterr().out

    def fake_configs(scale, *, save, server, tag, configs):
        calls.append((server, configs))
        return {"summary": pd.DataFrame({"design": ["naive"], "speedup": [1.0]})}

    experiments.suite_main(fake_configs, {"ci": {}}, ["--random-weights", "--configs",
                                                        "naive; uint8 transfer, normalize after copy"])
    assert calls[-1] == ({"pretrained": False}, ("naive", "uint8 transfer, normalize after copy"))
    for bad in (["--scale", "huge"], ["--accelerator", "tpu"]):
        with pytest.raises(SystemExit):
            experiments.suite_main(fake, {"ci": {}}, bad)


@pytest.mark.slow  # two servers boot and are measured for 2 s each: about a minute on 2 shared cores
def test_decode_pool_design_runs_in_the_optimizations_suite_at_ci_scale():
    out = experiments.run_optimizations_suite("ci", configs=("combined, 1 worker",
                                                              "combined, 1 worker, decode pool of 2"))
    runs, summary = out["runs"], out["summary"].set_index("design")
    assert set(summary.index) == {"combined, 1 worker", "combined, 1 worker, decode pool of 2"}
    assert (runs["errors"] == 0).all() and (runs["ok"] > 0).all()
    assert summary.loc["combined, 1 worker", "speedup"] == 1.0
    assert summary["throughput_rps"].gt(0).all()


def test_unknown_design_is_an_error():
    with pytest.raises(ValueError, match="unknown designs"):
        experiments.run_optimizations_suite("ci", configs=("naive", "teleport"))


def test_server_overrides_from_the_shared_options():
    import argparse

    from effllm_lib.serving.experiments import add_server_args, server_overrides

    ap = argparse.ArgumentParser()
    add_server_args(ap)
    assert server_overrides(ap.parse_args([])) is None  # the servers' own defaults
    args = ap.parse_args(["--accelerator", "cuda", "--random-weights", "--lenient-jpeg"])
    assert server_overrides(args, decoder="nvjpeg", unused=None) == {
        "accelerator": "cuda", "decoder": "nvjpeg", "strict_jpeg": False, "pretrained": False}
