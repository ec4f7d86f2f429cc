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


def tiny_model_dir(tmp_path, hidden=128):
    """A small random Llama with SmolLM2's tokenizer, saved as a transformers folder (what train_lm writes)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from effllm_lib.models import hf_dir

    tok = AutoTokenizer.from_pretrained(hf_dir("smollm2-135m"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    folder = tmp_path / "tiny"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.slow  # ~40 s of CPU: quantizing a 49152-row head 16 ways
def test_kl_sweep_with_clipping_and_awq_then_merge(tmp_path):
    folder = tiny_model_dir(tmp_path)
    wiki, austen = tmp_path / "wiki.txt", tmp_path / "austen.txt"
    wiki.write_text(assets.wikipedia_text("ci")[:3000])
    austen.write_text(assets.austen_text("ci")[:3000])
    common = ["--model", "tiny", "--model-dir", str(folder), "--text", f"wiki={wiki}", "--calib-text", str(austen),
              "--calib-windows", "2", "--calib-seq-len", "32", "--calib-sample", "32", "--max-windows", "4",
              "--kl-windows", "2", "--seq-len", "32", "--methods", "int_asym,bitmod", "--device", "cpu",
              "--out", str(tmp_path), "--scale", "ci", "--n-boot", "200"]
    assert accuracy.main(common + ["--bits", "3", "--clip", "0,1", "--calibration", "none,awq", "--tag", "w3"]) == 0
    w = results.read(tmp_path / "windows_tiny_w3.csv")
    assert sorted(w.config.unique()) == sorted(["float", "int_asym3", "int_asym3+clip", "int_asym3+awq",
                                                "int_asym3+clip+awq", "bitmod3", "bitmod3+clip", "bitmod3+awq",
                                                "bitmod3+clip+awq"])
    assert (w.groupby("config").size() == 4).all() and (w.groupby("config").kl_sum.count() == 2).all()
    assert (w[w.config != "float"].kl_sum.dropna() > 0).all()
    s = results.read(tmp_path / "accuracy_tiny_w3.csv").set_index("config")
    assert s.kl["float"] == 0 and (s.kl.drop("float") > 0).all() and s.bits_per_weight["bitmod3"] == 3.0625
    o = results.read(tmp_path / "orderings_tiny_w3.csv")
    assert {"int_asym vs bitmod", "bitmod vs float", "bitmod: clip vs none", "bitmod: awq vs none"} <= set(o.comparison)
    # a second run (another bit width) merged with the first: float kept once, one table for both
    assert accuracy.main(common + ["--bits", "4", "--clip", "0", "--tag", "w4"]) == 0
    assert accuracy.main(["--summarize", str(tmp_path / "windows_tiny_w3.csv"), str(tmp_path / "windows_tiny_w4.csv"),
                          "--out", str(tmp_path), "--scale", "ci", "--n-boot", "200"]) == 0
    merged = results.read(tmp_path / "accuracy_tiny.csv")
    assert len(merged) == 9 + 2 and (merged.config == "float").sum() == 1


def test_calibration_without_text_is_refused(tmp_path):
    wiki = tmp_path / "wiki.txt"
    wiki.write_text("x")
    with pytest.raises(FileNotFoundError, match="calib-text"):
        accuracy.main(["--model", "m", "--gguf", str(assets.smollm2_gguf()), "--text", f"w={wiki}",
                       "--calibration", "awq", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        accuracy.main(["--model", "m", "--gguf", "x", "--calibration", "smoothquant", "--out", str(tmp_path)])


@pytest.mark.slow  # ~30 s: GPTQ over a 49152-row head
def test_kl_sweep_with_gptq(tmp_path):
    folder = tiny_model_dir(tmp_path)
    wiki, austen = tmp_path / "wiki.txt", tmp_path / "austen.txt"
    wiki.write_text(assets.wikipedia_text("ci")[:2000])
    austen.write_text(assets.austen_text("ci")[:2000])
    assert accuracy.main(["--model", "tiny", "--model-dir", str(folder), "--text", f"wiki={wiki}", "--calib-text",
                          str(austen), "--calib-windows", "2", "--calib-seq-len", "32", "--max-windows", "2",
                          "--kl-windows", "2", "--seq-len", "32", "--methods", "bitmod", "--device", "cpu",
                          "--bits", "3", "--clip", "0", "--calibration", "none,gptq", "--out", str(tmp_path),
                          "--scale", "ci", "--n-boot", "100"]) == 0
    o = results.read(tmp_path / "orderings_tiny.csv")
    assert "bitmod: gptq vs none" in set(o.comparison)
