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
    assert calls == [("full", True, {"accelerator": "cuda"}, "_h100"), ("ci", False, None, "")]
    assert "naive" in capsys.readouterr().out
    for bad in (["--scale", "huge"], ["--accelerator", "tpu"]):
        with pytest.raises(SystemExit):
            experiments.suite_main(fake, {"ci": {}}, bad)
