"""The committed claims and results files are consistent: every paper file follows the schema, every
measured claim names a real claim, and the scorecard builds."""
import pytest

from effllm_lib import CHAPTERS, scorecard


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_committed_claims_file_is_valid(chapter):
    claims = scorecard.paper_claims(chapter)
    assert len(claims) >= 3, "every paper has several headline claims"
    assert all(s.strip() for s in claims.source), "every claim names its source"


def test_committed_scorecard_builds():
    table = scorecard.table()
    assert set(table.verdict) <= set(scorecard.VERDICTS)


def test_committed_verdicts_follow_the_provenance_rule():
    """No claim's verdict rests on a results file from a dirty or unknown tree, and every file a claim points
    to exists and loads (its checksum matches)."""
    table = scorecard.table()
    scored = table[~table.verdict.isin(["not reproducible here", "not yet measured", "withdrawn"])]
    assert not scored.dirty.fillna(False).astype(bool).any(), scored[scored.dirty.fillna(False).astype(bool)]
    model = table[table.kind == "model"]
    assert not model.verdict.isin(["reproduced", "trend reproduced"]).any()
