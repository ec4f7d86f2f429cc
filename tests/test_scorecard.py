import pandas as pd
import pytest

from effllm_lib import CHAPTERS, results, scorecard

HEADER = ",".join(scorecard.PAPER_COLUMNS) + "\n"


def write_claims(tmp_data, chapter, rows):
    (tmp_data / "paper" / f"{chapter}.csv").write_text(HEADER + "".join(r + "\n" for r in rows))


@pytest.fixture
def clean_tree(monkeypatch):
    """Results saved by the tests name a clean commit, as results from a committed tree would."""
    monkeypatch.setenv("EFFLLM_COMMIT", "a" * 40)
    monkeypatch.setenv("EFFLLM_DIRTY", "0")


@pytest.fixture
def claims(tmp_data, clean_tree):
    for ch in CHAPTERS:
        write_claims(tmp_data, ch, [])
    write_claims(tmp_data, "bitmod", [
        "speed,BitMoD vs ANT,speed-up,1.69,x,[derived],0.05,>1,,empirical,1,,",
        "ppl,3-bit perplexity,perplexity,6.51,,[repo: x y],0.05,<7.51,,empirical,,,",
        "unk,Accuracy loss,loss,unknown,%,[abstract],,<0.5,,empirical,,,",
        "gone,Needs a GPU,speed-up,2.0,x,[abstract],0.1,,,empirical,1,,",
        "never,Not measured,x,3,x,[abstract],0.1,,,empirical,1,,",
        "sim,Simulated speed-up,speed-up,8.76,x,[derived],0.01,>1,,model,1,,",
        "acc,Accuracy gain,points,24,points,[abstract],0.25,>0,,empirical,,yes,",
    ])
    return tmp_data


# -------------------------------------------------------------------------------------------- the rule
@pytest.mark.parametrize("paper, ours, tol, trend, expected", [
    (1.69, 1.70, 0.05, ">1", "reproduced"),
    (1.69, 1.40, 0.05, ">1", "trend reproduced"),
    (1.69, 0.90, 0.05, ">1", "differs"),
    ("unknown", 0.3, "", "<0.5", "trend reproduced"),
    ("unknown", 0.7, "", "<0.5", "differs"),
    (2.0, None, 0.1, "", "not yet measured"),
    (0.0, 0.01, 0.02, "", "reproduced"),    # paper value 0: absolute tolerance
    (1.0, 1.11, 0.1, "", "differs"),
    (5.0, 5.0, "", ">=5", "trend reproduced"),
    (5.47, 8.0, 0.05, "", "differs"),       # an absolute value with no direction: close or not
])
def test_verdict_rule(paper, ours, tol, trend, expected):
    assert scorecard.verdict(paper, ours, tol, trend)[0] == expected


def test_direction_is_checked_before_the_tolerance():
    # within 10% of the paper's value, but on the wrong side of the threshold that states the claim
    assert scorecard.verdict(1.05, 0.98, 0.1, ">1")[0] == "differs"
    # no stated trend: the paper's side of the effect baseline is the direction
    assert scorecard.verdict(1.05, 0.98, 0.1, "", effect_baseline=1)[0] == "differs"
    assert scorecard.verdict(1.05, 1.03, 0.5, "", effect_baseline=1)[0] == "reproduced"


def test_tolerance_applies_to_the_effect_of_a_ratio():
    """1.029 against the paper's 1.065 is within 4% as a ratio but an effect of 0.45x."""
    assert scorecard.verdict(1.0647, 1.029, 0.1, ">1")[0] == "reproduced"            # the old, lenient reading
    assert scorecard.verdict(1.0647, 1.029, 0.1, ">1", effect_baseline=1)[0] == "trend reproduced"
    assert scorecard.verdict(1.0647, 1.062, 0.1, ">1", effect_baseline=1)[0] == "reproduced"


@pytest.mark.parametrize("lo, hi, expected", [
    (0.5, 3.0, "trend reproduced"),      # wholly above 0, wholly below the band [18, 30]
    (20.0, 26.0, "reproduced"),          # inside the band [18, 30]
    (15.0, 26.0, "trend reproduced"),    # direction decided, size not
    (-1.0, 5.0, "inconclusive"),         # spans the threshold 0 of '>0'
    (-1.0, 25.0, "inconclusive"),
])
def test_interval_decides(lo, hi, expected):
    ours = (lo + hi) / 2
    assert scorecard.verdict(24, ours, 0.25, ">0", lo=lo, hi=hi)[0] == expected


def test_accuracy_claim_without_interval_is_inconclusive():
    assert scorecard.verdict(24, 24, 0.25, ">0", needs_interval=True)[0] == "inconclusive"
    assert scorecard.verdict(24, 24, 0.25, ">0", needs_interval=True, lo=22, hi=26)[0] == "reproduced"


def test_bad_interval_is_an_error():
    with pytest.raises(scorecard.ScorecardError, match="does not contain"):
        scorecard.verdict(1, 2, 0.1, "", lo=0.5, hi=1.5)
    with pytest.raises(scorecard.ScorecardError, match="both"):
        scorecard.verdict(1, 1, 0.1, "", lo=0.5)


def test_model_rows_never_count_as_reproduced():
    assert scorecard.verdict(8.76, 8.7598, 0.01, ">1", kind="model")[0] == "model check"
    assert scorecard.verdict(8.76, 7.0, 0.01, ">1", kind="model")[0] == "model differs"


def test_ratio_is_ours_over_paper():
    assert scorecard.verdict(2.0, 3.0, 0.1, "")[1] == pytest.approx(1.5)
    assert scorecard.verdict("unknown", 3.0, "", ">1")[1] is None


# ---------------------------------------------------------------------------------------- the table
def test_table_joins_claims_and_results(claims):
    results.save(pd.DataFrame({"claim_id": ["speed", "ppl", "unk", "sim"], "ours": [1.47, 6.6, 0.2, 8.7598],
                               "reason": ["gap", "", "", ""]}), "bitmod", "claims_a", scale="full")
    results.save(pd.DataFrame({"claim_id": ["gone"], "ours": [None], "status": ["not_reproducible"],
                               "reason": ["no GPU here"]}), "bitmod", "claims_b", scale="full")
    results.save(pd.DataFrame({"claim_id": ["acc"], "ours": [3.0], "ours_lo": [1.0], "ours_hi": [5.0],
                               "stand_in": ["a 135M model on gsm_symbolic"]}), "bitmod", "claims_c", scale="full")
    results.save(pd.DataFrame({"model": ["x"], "ppl": [1.0]}), "bitmod", "other", scale="full")  # ignored
    t = scorecard.table("bitmod").set_index("claim_id")
    assert t.loc["speed", "verdict"] == "trend reproduced" and t.loc["speed", "reason"] == "gap"
    assert t.loc["ppl", "verdict"] == "reproduced"
    assert t.loc["unk", "verdict"] == "trend reproduced" and pd.isna(t.loc["unk", "ratio"])
    assert t.loc["gone", "verdict"] == "not reproducible here" and t.loc["gone", "reason"] == "no GPU here"
    assert t.loc["never", "verdict"] == "not yet measured"
    assert t.loc["sim", "verdict"] == "model check"
    assert t.loc["acc", "verdict"] == "stand-in: trend reproduced"
    assert t.loc["speed", "results_file"] == "bitmod/claims_a.csv"
    assert t.loc["speed", "commit"] == "aaaaaaaa" and t.loc["speed", "dirty"] == False  # noqa: E712
    assert "core" in t.loc["speed", "machine"]
    view = scorecard.render("bitmod")
    assert {"claim", "kind", "paper value", "ours", "95% interval", "verdict", "machine", "results file",
            "commit"} <= set(view.columns)
    assert view.set_index("claim").loc["acc", "95% interval"] == "[1, 5]"
    summary = scorecard.summary().loc["BitMoD"]
    assert summary.sum() == 7 and summary["stand-in"] == 1 and summary["model check"] == 1


def test_dirty_results_are_withdrawn(claims, monkeypatch):
    monkeypatch.setenv("EFFLLM_DIRTY", "1")
    results.save(pd.DataFrame({"claim_id": ["speed"], "ours": [1.7]}), "bitmod", "claims_a", scale="full")
    row = scorecard.table("bitmod").set_index("claim_id").loc["speed"]
    assert row["verdict"] == "withdrawn" and "dirty" in row["reason"]
    monkeypatch.delenv("EFFLLM_DIRTY")   # unknown tree state: no better
    results.save(pd.DataFrame({"claim_id": ["speed"], "ours": [1.71]}), "bitmod", "claims_a", scale="full")
    assert scorecard.table("bitmod").set_index("claim_id").loc["speed", "verdict"] == "withdrawn"


def test_measured_in_names_the_measuring_machine(tmp_data, clean_tree):
    for ch in CHAPTERS:
        write_claims(tmp_data, ch, [])
    write_claims(tmp_data, "pqa", ["loss,Accuracy loss,loss,0.6,points,[abstract],0.5,<=1,,empirical,,,sweep"])
    results.save(pd.DataFrame({"acc": [1.0]}), "pqa", "sweep", scale="full",
                 hardware={"cpu": "Intel(R) Xeon(R) Processor", "cores": 16, "cpu_flags": ["amx_tile"],
                           "gpu": "NVIDIA H200"})
    results.save(pd.DataFrame({"claim_id": ["loss"], "ours": [0.7]}), "pqa", "claims", scale="full")
    row = scorecard.table("pqa").set_index("claim_id").loc["loss"]
    assert row["machine"] == "NVIDIA H200 host, Intel Xeon 16 cores, AMX"
    assert row["measured_in"] == "pqa/sweep.csv" and row["verdict"] == "reproduced"


def test_measured_in_pointing_nowhere_is_an_error(tmp_data, clean_tree):
    for ch in CHAPTERS:
        write_claims(tmp_data, ch, [])
    write_claims(tmp_data, "pqa", ["loss,Accuracy loss,loss,0.6,points,[abstract],0.5,<=1,,empirical,,,sweep"])
    with pytest.raises(scorecard.ScorecardError, match="pqa/sweep.csv, which does not exist"):
        scorecard.table("pqa")
    results.save(pd.DataFrame({"acc": [1.0]}), "pqa", "sweep", scale="full")
    with pytest.raises(scorecard.ScorecardError, match="no results file gives it a value"):
        scorecard.table("pqa")


def test_non_numeric_ours_is_an_error(claims):
    results.save(pd.DataFrame({"claim_id": ["speed"], "ours": ["fast"]}), "bitmod", "a", scale="full")
    with pytest.raises(scorecard.ScorecardError, match="ours 'fast' is not a number"):
        scorecard.table("bitmod")


def test_truncated_results_file_is_an_error(claims):
    path = results.save(pd.DataFrame({"claim_id": ["speed", "ppl"], "ours": [1.7, 6.6]}), "bitmod", "a",
                        scale="full")
    path.write_text(path.read_text().rsplit("\n", 2)[0] + "\n")   # the last row lost
    with pytest.raises(results.ResultsError, match="a.csv: the table does not match the checksum"):
        scorecard.table("bitmod")


def test_claim_measured_twice_is_an_error(claims):
    for name in ("a", "b"):
        results.save(pd.DataFrame({"claim_id": ["speed"], "ours": [1.0]}), "bitmod", name, scale="full")
    with pytest.raises(scorecard.ScorecardError, match="more than one results file"):
        scorecard.table("bitmod")


def test_unknown_claim_in_results_is_an_error(claims):
    results.save(pd.DataFrame({"claim_id": ["typo"], "ours": [1.0]}), "bitmod", "a", scale="full")
    with pytest.raises(scorecard.ScorecardError, match="typo"):
        scorecard.table("bitmod")


@pytest.mark.parametrize("row, msg", [
    ("x,d,q,about 3,x,[abstract],0.1,,,empirical,,,", "neither a number nor 'unknown'"),
    ("x,d,q,3,x,[abstract],0.1,bigger,,empirical,,,", "is not like"),
    ("x,d,q,3,x,[abstract],ten,,,empirical,,,", "tolerance"),
    ("x,d,q,3,x,[abstract],0.1,,,guess,,,", "kind 'guess'"),
    ("x,d,q,3,x,[abstract],0.1,,,model,one,,", "effect_baseline"),
    ("x,d,q,3,x,[abstract],0.1,,,model,1,maybe,", "needs_interval"),
])
def test_bad_claims_file(tmp_data, row, msg):
    write_claims(tmp_data, "pqa", [row])
    with pytest.raises(scorecard.ScorecardError, match=msg):
        scorecard.paper_claims("pqa")


def test_cli(claims, capsys):
    assert scorecard.main(["bitmod"]) == 0
    out = capsys.readouterr().out
    assert "speed" in out and "not yet measured" in out
    assert scorecard.main(["bitmod", "--csv"]) == 0
    csv_out = capsys.readouterr().out
    assert csv_out.startswith("chapter,claim_id,") and "never" in csv_out
    with pytest.raises(SystemExit) as exc:
        scorecard.main(["nochapter"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        scorecard.main(["--bogus"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        scorecard.main(["--help"])
    assert exc.value.code == 0 and "--csv" in capsys.readouterr().out
