"""The H200 device driver's own logic (the measurements it runs are the suites' and have their own tests)."""
import importlib.util
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "serving_h200.py"


@pytest.fixture(scope="module")
def driver():
    spec = importlib.util.spec_from_file_location("serving_h200", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parts_fit_a_device_call(driver):
    for part, steps in driver.PARTS.items():
        assert sum(driver.ESTIMATE_MIN[s] for s in steps) <= 9.5 * 0.8, part  # a margin for start-up and install
    assert "pinned host memory" in driver.H200_OPTIMIZATIONS
    assert "combined, batched GPU decode" in driver.H200_OPTIMIZATIONS


def test_full_scale_without_a_gpu_is_refused(driver, capsys):
    gpu, _ = driver.gpu_status()
    if gpu:
        pytest.skip("this machine has the GPU")
    assert driver.main(["--part", "1", "--scale", "full"]) == 2
    assert "needs the GPU" in capsys.readouterr().err


def test_steps_must_belong_to_the_part(driver):
    with pytest.raises(SystemExit):
        driver.main(["--part", "1", "--steps", "fair", "--scale", "ci"])


def test_scale_table_is_restored_even_on_error(driver):
    table = {"full": {"passes": 5, "duration": 6.0}}
    with pytest.raises(RuntimeError):
        with driver.scale_table(table, "full", {"passes": 3}):
            assert table["full"] == {"passes": 3, "duration": 6.0}
            raise RuntimeError("a step failed")
    assert table["full"] == {"passes": 5, "duration": 6.0}
