import json
import os

import pandas as pd
import pytest

from effllm_lib import results


def frame():
    return pd.DataFrame({"model": ["a", "b"], "ppl": [10.5, 12.25]})


def test_round_trip_with_full_provenance(tmp_data):
    path = results.save(frame(), "bitmod", "ppl", params={"bits": 3, "models": ["a"]}, scale="ci",
                        extra={"note": "x"})
    assert path == tmp_data / "results" / "bitmod" / "ci" / "ppl.csv"  # CI-scale runs never touch published files
    df = results.load("bitmod", "ppl")
    pd.testing.assert_frame_equal(df, frame())
    meta = df.attrs["provenance"]
    for key in results.REQUIRED_KEYS:
        assert key in meta
    assert meta["params"] == {"bits": 3, "models": ["a"]}
    assert meta["scale"] == "ci" and meta["chapter"] == "bitmod" and meta["extra"] == {"note": "x"}
    assert len(meta["commit"]) == 40 or meta["commit"] == "unknown"
    assert meta["dirty"] in (True, False, None)
    hw = meta["hardware"]
    assert hw["cores"] == os.cpu_count() and hw["cpu"] and isinstance(hw["cpu_flags"], list)
    assert "torch" in hw
    # the date is an ISO timestamp with a timezone
    assert meta["date"][4] == "-" and meta["date"].endswith("+00:00")


def test_header_is_readable_text(tmp_data):
    path = results.save(frame(), "pqa", "t", params={}, scale="full")
    lines = path.read_text().splitlines()
    header = [l for l in lines if l.startswith("# ")]
    assert {l[2:].split(":")[0] for l in header} >= set(results.REQUIRED_KEYS)
    assert lines[len(header)] == "model,ppl"
    json.loads(header[0].split(": ", 1)[1])


def test_atomic_write_keeps_old_file_on_failure(tmp_data, monkeypatch):
    results.save(frame(), "pqa", "t", scale="full")
    before = (tmp_data / "results" / "pqa" / "t.csv").read_text()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", boom)
    with pytest.raises(OSError):
        results.save(frame().assign(ppl=[0.0, 0.0]), "pqa", "t", scale="full")
    assert (tmp_data / "results" / "pqa" / "t.csv").read_text() == before
    assert [p.name for p in (tmp_data / "results" / "pqa").iterdir()] == ["t.csv"]  # no temp file left


@pytest.mark.parametrize("kwargs, msg", [
    (dict(chapter="nope", name="x", scale="ci"), "unknown chapter"),
    (dict(chapter="pqa", name="a/b", scale="ci"), "plain file stem"),
    (dict(chapter="pqa", name="x", scale="huge"), "scale must be"),
])
def test_bad_arguments(tmp_data, kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        results.save(frame(), **kwargs)


def test_empty_frame_rejected(tmp_data):
    with pytest.raises(ValueError, match="non-empty"):
        results.save(pd.DataFrame(), "pqa", "x", scale="ci")


def test_missing_file_names_it(tmp_data):
    with pytest.raises(results.ResultsError, match=r"results/pqa/nothing.csv: results file not found"):
        results.load("pqa", "nothing")


@pytest.mark.parametrize("content, msg", [
    ("model,ppl\na,1\n", "provenance is missing"),
    ("# chapter: {not json\nmodel\na\n", "is not JSON"),
    ("# chapter\nmodel\na\n", "not '# key: value'"),
    ("".join(f'# {k}: "x"\n' for k in results.REQUIRED_KEYS), "no table"),
    ("".join(f'# {k}: "x"\n' for k in results.REQUIRED_KEYS) + "model,ppl\n", "no rows"),
    ("".join(f'# {k}: "x"\n' for k in results.REQUIRED_KEYS) + 'a,b\n1,"2\n', "not valid CSV"),
])
def test_malformed_files_give_clear_errors(tmp_data, content, msg):
    path = tmp_data / "results" / "pqa" / "bad.csv"
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(results.ResultsError, match=msg) as err:
        results.load("pqa", "bad")
    assert "bad.csv" in str(err.value)


def test_describe_mentions_hardware_scale_commit(tmp_data):
    results.save(frame(), "pqa", "t", scale="full")
    line = results.describe(results.load("pqa", "t").attrs["provenance"])
    assert "scale full" in line and "commit" in line and "cores" in line


def test_identical_rerun_does_not_rewrite(tmp_data):
    path = results.save(frame(), "pqa", "t", params={"a": 1}, scale="full")
    first = path.read_text()
    path2 = results.save(frame(), "pqa", "t", params={"a": 1}, scale="full")
    assert path2 == path and path.read_text() == first  # same numbers, same setup: untouched
    changed = frame().assign(ppl=[1.0, 2.0])
    results.save(changed, "pqa", "t", params={"a": 1}, scale="full")
    pd.testing.assert_frame_equal(results.load("pqa", "t"), changed)
    results.save(changed, "pqa", "t", params={"a": 2}, scale="full")
    assert results.load("pqa", "t").attrs["provenance"]["params"] == {"a": 2}


def test_full_scale_file_shadows_ci_one(tmp_data):
    results.save(frame(), "pqa", "t", scale="ci")
    assert results.load("pqa", "t").attrs["provenance"]["scale"] == "ci"   # only the CI run exists
    assert results.available("pqa") == []                                   # the scorecard ignores it
    results.save(frame(), "pqa", "t", scale="full")
    assert results.load("pqa", "t").attrs["provenance"]["scale"] == "full"
    assert results.available("pqa") == ["t"]


def test_dirty_flag_ignores_results_files(monkeypatch):
    outputs = {"rev-parse": "abc", "status": " M data/results/pqa/x.csv\n M data/results/bitmod/y.csv"}
    monkeypatch.delenv("EFFLLM_COMMIT", raising=False)
    monkeypatch.setattr(results, "_git", lambda *a: outputs[a[0]])
    assert results.git_state() == {"commit": "abc", "dirty": False}
    outputs["status"] = " M data/results/pqa/x.csv\n M effllm_lib/results.py"
    assert results.git_state()["dirty"] is True


def test_commit_from_environment(monkeypatch):
    monkeypatch.setenv("EFFLLM_COMMIT", "f" * 40)
    monkeypatch.delenv("EFFLLM_DIRTY", raising=False)
    assert results.git_state() == {"commit": "f" * 40, "dirty": None}
    monkeypatch.setenv("EFFLLM_DIRTY", "0")
    assert results.git_state()["dirty"] is False


def test_save_records_the_hardware_of_the_machine_that_measured(tmp_data):
    """A table merged here from another machine's logs names that machine, not this one."""
    df = pd.DataFrame({"a": [1]})
    path = results.save(df, "splitreason", "elsewhere", scale="full", hardware={"gpu": "NVIDIA H100 80GB HBM3"})
    text = path.read_text()
    assert '# hardware: {"gpu": "NVIDIA H100 80GB HBM3"}' in text


@pytest.mark.parametrize("damage", ["truncate", "edit", "drop_checksum"])
def test_damaged_file_is_an_error_naming_it(tmp_data, damage):
    path = results.save(pd.DataFrame({"a": [1, 2, 3], "b": [0.5, 0.25, 0.125]}), "pqa", "t", scale="full")
    text = path.read_text()
    if damage == "truncate":
        text = text[: text.rindex("3,0.125")]
    elif damage == "edit":
        text = text.replace("0.25", "0.35")
    else:
        text = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("# rows_sha256"))
    path.write_text(text)
    msg = "provenance is missing rows_sha256" if damage == "drop_checksum" else "does not match the checksum"
    with pytest.raises(results.ResultsError, match=msg) as err:
        results.load("pqa", "t")
    assert "t.csv" in str(err.value)


def test_machine_name():
    assert results.machine_name({"cpu": "AMD EPYC 9B14", "cores": 2}) == "2-core AMD EPYC 9B14"
    xeon = {"cpu": "Intel(R) Xeon(R) Processor", "cores": 16, "cpu_flags": ["avx512f", "amx_tile"],
            "gpu": "NVIDIA H200"}
    assert results.machine_name(xeon) == "NVIDIA H200 host, Intel Xeon 16 cores, AMX"


def test_stamp_checksums_only_adds_a_missing_line(tmp_data):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("stamp", Path(__file__).parent.parent / "scripts" / "stamp_checksums.py")
    stamp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stamp)
    path = results.save(pd.DataFrame({"a": [1, 2]}), "pqa", "t", scale="full")
    good = path.read_text()
    path.write_text("".join(l for l in good.splitlines(keepends=True) if not l.startswith("# rows_sha256")))
    assert stamp.stamp(path) is True and path.read_text().endswith("a\n1\n2\n")
    results.load("pqa", "t")
    path.write_text(path.read_text().replace("\n2\n", "\n7\n"))   # damaged after stamping: never re-stamped
    assert stamp.stamp(path) is False
    with pytest.raises(results.ResultsError, match="checksum"):
        results.load("pqa", "t")
