"""The files-only entry point of the BitMoD accuracy study (what the GPU machine runs), on the packaged
SmolLM2 GGUF with its own tokenizer, one method, one short window."""

import pytest

from effllm_lib import assets, results
from effllm_lib.bitmod import accuracy

pytestmark = pytest.mark.usefixtures("one_thread")


def test_main_runs_a_sweep_from_files_alone(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(assets.wikipedia_text("ci")[:4000])
    rc = accuracy.main(["--model", "smollm2-135m", "--gguf", str(assets.smollm2_gguf()), "--text", f"wiki={text}",
                        "--max-windows", "1", "--seq-len", "64", "--what", "ppl", "--methods", "bitmod",
                        "--bits", "4", "--device", "cpu", "--out", str(tmp_path)])
    assert rc == 0
    df = results.read(tmp_path / "perplexity_smollm2-135m.csv")
    assert list(df.dtype) == ["float", "bitmod"]
    assert df.ppl.between(1, 1e4).all() and df.ppl.iloc[1] > df.ppl.iloc[0] * 0.9


def test_main_refuses_an_unknown_method_and_a_missing_file(tmp_path):
    with pytest.raises(SystemExit):
        accuracy.main(["--model", "m", "--gguf", "x.gguf", "--methods", "int9", "--out", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="no GGUF"):
        accuracy.main(["--model", "m", "--gguf", str(tmp_path / "x.gguf"), "--text", f"w={tmp_path}/t",
                       "--what", "ppl", "--out", str(tmp_path)])
