"""The breakdown under load: argument checks, and a short run whose spans add up to each request's latency."""
import pytest

from effllm_lib.serving import loaded, profiler


def test_bad_arguments():
    with pytest.raises(ValueError, match="scale"):
        loaded.run("huge")
    with pytest.raises(ValueError, match="CUDA"):
        loaded.run("ci", decoders=("nvjpeg",))


@pytest.mark.slow
def test_ci_run_under_load_batches_and_spans_add_up():
    out = loaded.run("ci", server={"pretrained": False})
    req = out["requests"]
    assert len(req) > 0 and (out["throughput"].errors == 0).all()
    # every request's stage spans add up to the latency the client saw (an independent stamp pair)
    total = req[list(profiler.STAGES)].sum(axis=1)
    assert (abs(total - req.total_ms) < 1e-3).all()
    # 8 clients on a batch-8 server: some requests share a batch
    assert out["breakdown"].mean_batch.iloc[0] > 1
