"""scripts/check_glue.py flags numbers typed into notebook prose and lets names, code and the paper's values be."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("check_glue", Path(__file__).parent.parent / "scripts" / "check_glue.py")
check_glue = importlib.util.module_from_spec(spec)
sys.modules["check_glue"] = check_glue  # dataclasses look their module up
spec.loader.exec_module(check_glue)


def flagged(md, allowed=frozenset()):
    return [n for n, _ in check_glue.typed_numbers(md, set(allowed))]


@pytest.mark.parametrize("md, numbers", [
    ("the medium image's preprocessing share is 65%.", ["65%"]),
    ("all CPU-side changes combined give 3.47x.", ["3.47x"]),
    ("3 rounds of 4 requests from one client (36 requests per point).", ["3", "4", "36"]),
    ("decoding takes 55 ms and the probe reads 7.9 GB/s.", ["55", "7.9"]),
    ("about 1.5-2x more slowly, sparsities 0-95 %", ["1.5-2x", "0-95"]),
    ("it reaches **0.87** of the bound", ["0.87"]),
    ("a bound of `3.47x` hidden in code", ["3.47x"]),
    ("and $0.87$ hidden in math", ["0.87"]),
    ("see [the result 65%](https://example.org/x)", ["65%"]),
    ("## Both machines at batch 1", ["1"]),
    ("16,384 tokens", ["16,384"]),
    ("we decode 2024 tokens", ["2024"]),
])
def test_typed_numbers_are_flagged(md, numbers):
    assert flagged(md) == numbers


@pytest.mark.parametrize("md", [
    "ResNet-20, Llama-3-8B, SmolLM2-135M and R1-Distill-Qwen-1.5B on an H200 with fp16 on x86-64, AVX-512",
    "a 4-bit grid, a 2-core CPU, 256-token chunks, 2-6-bit PQ, the 135M model, the 2nd run, commit 2db80ad",
    "photos of 2560x1600 and crops of 224x224x3 pixels; Jupyter Book 1.0.4",
    "the share is {glue:text}`share_medium:.0f`% and {glue}`speedup` and {{ n_requests }}",
    "`max_batch_size=8`, `batch_timeout=5 ms` and `round(offload x D) // 256` are code",
    "the formula $2 / (2 (1 - s) + 1/8)$ and $$x^{2} + 3$$",
    "a [link](https://example.org/v1.2/page_3) and <https://example.org/2024> and <!-- 65% -->",
    "1. first item\n2. second item\n## 3. A numbered heading",
    "Section 4.4 of the paper, Table 2, Figure 3, notebook 01, part 2, issue 13, #13",
    "*Beyond Inference* (AbouElhamayed et al., DAC 2024) and SparAMX (AbouElhamayed et al., 2025)",
    "```python\nx = 65.3\n```\n",
    "```{figure} img.png\n:width: 80%\nA caption without numbers.\n```\n",
])
def test_names_code_and_markup_are_not_flagged(md):
    assert flagged(md) == []


def test_directive_body_is_prose():
    assert flagged("```{note}\nThe share is 65%.\n```\n") == ["65%"]


def test_paper_values_may_be_quoted_and_nothing_else():
    allowed = {56.0, 80.0}
    assert flagged('"up to 56%" and "~80%" of throughput, ours 65%', allowed) == ["65%"]


def test_paper_values_read_from_the_chapter_csv(tmp_path):
    (tmp_path / "serving.csv").write_text(
        "claim_id,description,quantity,paper_value,unit,source,tolerance,trend,notes\n"
        "a,share for a 4.1 MP image,share,56,%,[abstract],0.15,>=28,ours is 65\n"
        "b,unknown one,share,unknown,%,[abstract],,,\n")
    values = check_glue.paper_values("serving", tmp_path)
    assert values == {56.0, 4.1}  # the notes (where our numbers may be written) are not the paper's


def test_sentence_is_reported():
    (n, sentence), = check_glue.typed_numbers("Intro text here. The share is 65% on CPU. Next one.")
    assert n == "65%" and sentence == "The share is 65% on CPU."


def write_nb(path, cells):
    nb = {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb))
    return path


def md(text):
    return {"cell_type": "markdown", "metadata": {}, "source": text}


def code(text):
    return {"cell_type": "code", "metadata": {}, "source": text, "outputs": [], "execution_count": None}


def test_notebook_findings_name_the_cell(tmp_path):
    nb = write_nb(tmp_path / "nb.ipynb", [
        md("# Title"),
        code('from myst_nb import glue\nglue("share", 65.2, display=False)'),
        md("Share {glue:text}`share:.0f`% and {glue:text}`other::speedup:.1f`x; typed 3.47x."),
        code("x = 65.3  # numbers in code cells are code"),
        md("And 12 ms."),
    ])
    findings = check_glue.check_file(nb, tmp_path)
    assert [(f.cell, f.number) for f in findings] == [(2, "3.47x"), (4, "12")]


def test_main_exit_status(tmp_path, capsys):
    good = write_nb(tmp_path / "good.ipynb", [md("A fp16 model on an H200.")])
    bad = write_nb(tmp_path / "bad.ipynb", [md("It gets 3.47x.")])
    assert check_glue.main([str(good)]) == 0
    assert check_glue.main([str(good), str(bad)]) == 1
    out = capsys.readouterr().out
    assert "bad.ipynb cell 0: '3.47x' in: It gets 3.47x." in out


def test_not_a_notebook_is_a_clear_error(tmp_path):
    p = tmp_path / "x.ipynb"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not a notebook"):
        check_glue.check_file(p)
    with pytest.raises(ValueError, match="expected a .ipynb"):
        check_glue.check_file(tmp_path / "x.txt")
