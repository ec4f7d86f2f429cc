"""scripts/device_qwen_parts.py: parts cut here, stashed and assembled there, byte for byte, idempotent."""

import importlib.util
import json
import os
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def parts(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("device_qwen_parts", ROOT / "scripts" / "device_qwen_parts.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    files = {"smollm2-135m": tmp_path / "src" / "small.gguf", "qwen2.5-1.5b": tmp_path / "src" / "big.gguf"}
    files["smollm2-135m"].parent.mkdir()
    files["smollm2-135m"].write_bytes(os.urandom(30_000) + b"\0" * 20_000)   # partly compressible
    files["qwen2.5-1.5b"].write_bytes(os.urandom(70_001))
    monkeypatch.setattr(mod, "asset_path", lambda name: files[name])
    return mod, files


def test_split_stash_assemble_round_trip(parts, tmp_path):
    mod, files = parts
    carry, work = tmp_path / "carry", tmp_path / "work"
    m = mod.split(carry, part_mib=0.02)  # ~21 KB parts
    n = len(m["parts"])
    assert n >= 4 and all(p["size"] <= 0.02 * 2**20 for p in m["parts"])
    assert [f["size"] for f in m["files"]] == [50_000, 70_001]
    assert mod.split(carry, part_mib=0.02) == m  # same files, same parts: nothing rewritten
    # the device gets one part per call: the carry folder holds the manifest and that part only
    there = tmp_path / "there"
    there.mkdir()
    (there / "manifest.json").write_text((carry / "manifest.json").read_text())
    for i, p in enumerate(m["parts"]):
        for old in there.glob("part*"):
            old.unlink()
        (there / p["name"]).write_bytes((carry / p["name"]).read_bytes())
        _, missing = mod.stash(there, work)
        assert len(missing) == n - i - 1
    paths = mod.assemble(m, work)
    for asset, src in files.items():
        assert paths[asset].read_bytes() == src.read_bytes()  # the reference: the original files
    assert not list((work / "parts").glob("part??"))             # parts dropped once the files verify
    assert mod.assemble(m, work) == paths                        # idempotent: stamps say done


def test_broken_part_and_foreign_manifest_are_refused(parts, tmp_path):
    mod, _ = parts
    carry, work = tmp_path / "carry", tmp_path / "work"
    m = mod.split(carry, part_mib=0.02)
    bad = carry / m["parts"][1]["name"]
    data = bytearray(bad.read_bytes())
    data[5] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="sha256 differs"):
        mod.stash(carry, work)
    other = json.loads((carry / "manifest.json").read_text())
    other["parts"][0]["sha256"] = "0" * 64
    (carry / "manifest.json").write_text(json.dumps(other))
    with pytest.raises(RuntimeError, match="another split"):
        mod.stash(carry, work)
    with pytest.raises(ValueError, match="part_mib"):
        mod.split(carry, part_mib=64)
    with pytest.raises(FileNotFoundError, match="manifest"):
        mod.stash(tmp_path / "nothing", work)


def test_assemble_detects_a_wrong_file_hash(parts, tmp_path):
    mod, _ = parts
    carry, work = tmp_path / "carry", tmp_path / "work"
    m = mod.split(carry, part_mib=0.02)
    mod.stash(carry, work)
    m = json.loads(json.dumps(m))
    m["files"][0]["sha256"] = "f" * 64
    with pytest.raises(RuntimeError, match="small.gguf"):
        mod.assemble(m, work)


def test_device_call_with_missing_parts_reports_and_packs(parts, tmp_path):
    mod, _ = parts
    carry, work, out = tmp_path / "carry", tmp_path / "work", tmp_path / "out"
    m = mod.split(carry, part_mib=0.02)
    (carry / m["parts"][-1]["name"]).unlink()
    (work / "logs" / "main").mkdir(parents=True)
    (work / "logs" / "main" / "small_only.jsonl").write_text('{"problem_id": "a"}\n')
    args = mod.main.__globals__["argparse"].Namespace(carry=carry, work=str(work), out=str(out), deadline_s=60,
                                                      pack_s=5, grace_s=5, workers=1, latency_n=1,
                                                      latency_budget_s=10, suffix="_test", lean=False)
    assert mod.device(args) == 0
    status = json.loads((out / "status.json").read_text())
    assert status["missing_parts"] == [m["parts"][-1]["name"]]
    with tarfile.open(out / "qwen_logs.tar.gz") as tar:
        assert "logs/main/small_only.jsonl" in tar.getnames()


@pytest.mark.slow
def test_device_call_runs_both_stages_on_tiny_models(parts, tmp_path, monkeypatch):
    """All parts here: assemble, then the latency stage (1 process, --latency) and the main stage (2 workers)
    on tiny models, with one calibration, everything packed into OUT."""
    from effllm_lib.offload.parallel import export_problems

    mod, _ = parts
    carry, work, out = tmp_path / "carry", tmp_path / "work", tmp_path / "out"
    mod.split(carry, part_mib=0.02)
    export_problems("multistep_arithmetic", 3, 1, carry / "problems_eval.jsonl")
    export_problems("multistep_arithmetic", 5, 7, tmp_path / "calib.jsonl")
    (carry / "problems_calib.jsonl").write_text((tmp_path / "calib.jsonl").read_text().splitlines()[-1] + "\n")
    (tmp_path / "data" / "results").mkdir(parents=True)
    monkeypatch.setenv("EFFLLM_DATA_DIR", str(tmp_path / "data"))
    argv = ["device", "--carry", str(carry), "--work", str(work), "--out", str(out), "--deadline-s", "900",
            "--grace-s", "60", "--workers", "2", "--latency-n", "1", "--suffix", "_t", "--lean",
            "--models", "tiny:llama:1,tiny:qwen2:2",
            "--eval-extra", "--device cpu --dtype float32 --max-new-tokens 6 --window 3 --big-span 3 --scale ci "
                            "--latency-methods dynamic,static"]
    assert mod.main(argv) == 0
    status = json.loads((out / "status.json").read_text())
    assert status["missing_parts"] == []
    assert [(s["stage"], s["rc"]) for s in status["stages"]] == [("latency", 0), ("main", 0)]
    assert status["stages"][0]["done_problems"] == 1 and status["stages"][1]["done_problems"] == 3
    logs = work / "logs"
    assert (logs / "main" / "thresholds.json").read_text() == (logs / "latency" / "thresholds.json").read_text()
    with tarfile.open(out / "qwen_results.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"trigger_modes_t.csv", "trigger_modes_t_idle.csv", "trigger_latency_t_idle.csv",
            "throughput_t_idle.csv"} <= names
    # a second call has nothing left to do in the latency stage and resumes the main logs
    assert mod.main(argv) == 0
    assert [s["stage"] for s in json.loads((out / "status.json").read_text())["stages"]] == ["main"]
