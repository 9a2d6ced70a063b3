"""pipeline/release/promotion.py without a registry: the decision from two figures, the rule
syntax, the cascade rule, and what is written on the version (tags, description paragraph).
The gate against a real MLflow store is tests/integration/test_promotion.py."""

import pytest

from pipeline.release.promotion import (
    ALREADY,
    FIRST,
    HEADING,
    KEPT,
    PROMOTED,
    Score,
    decide,
    decide_cascade,
    parse_rule,
    with_paragraph,
)


def test_rule_syntax_is_the_clis_promote_on():
    assert parse_rule() == ("val/loss", "min")
    assert parse_rule("val/loss") == ("val/loss", "min")
    assert parse_rule("eval/clip_score") == ("eval/clip_score", "max")  # the CLI's default
    assert parse_rule("eval/fid") == ("eval/fid", "min")
    assert parse_rule("eval/alignment:min") == ("eval/alignment", "min")
    assert parse_rule("val/loss", "max") == ("val/loss", "max")
    for bad in ("val/loss:lowest", ":min"):
        with pytest.raises(ValueError, match="METRIC:min or METRIC:max"):
            parse_rule(bad)


def test_a_lower_val_loss_promotes_and_the_line_shows_both_figures():
    d = decide("imagen-base64", "3", "val/loss", "min", Score(0.1234, 12), "2", Score(0.14, 12), stage="base64")
    assert d.decision == PROMOTED and d.promoted
    assert d.line() == "[promote] imagen-base64 v3: val/loss 0.1234 beats champion v2's 0.1400: promoted"
    assert d.tags() == {
        "promotion.decision": "promoted", "promotion.reason": "val/loss 0.1234 beats champion v2's 0.1400",
        "promotion.metric": "val/loss:min", "promotion.value": "0.1234", "promotion.champion_value": "0.14",
        "promotion.champion_version": "2", "promotion.samples": "12"}
    assert d.as_dict()["promoted"] is True and d.as_dict()["stage"] == "base64"


def test_a_worse_one_stays_challenger_and_says_how_to_promote_by_hand():
    d = decide("imagen-base64", "3", "val/loss", "min", Score(0.2, 12), "2", Score(0.14, 12))
    assert d.decision == KEPT and not d.promoted
    assert d.line() == ("[promote] imagen-base64 v3: val/loss 0.2000 does not beat champion v2's 0.1400: "
                        "stays challenger (to promote it anyway: imagen-pipeline register --name imagen-base64 "
                        "--promote --version 3)")
    paragraph = d.paragraph()
    assert paragraph.startswith(HEADING) and "0.2000" in paragraph and "0.1400" in paragraph
    assert "same 12 held-out samples" in paragraph
    assert "`imagen-pipeline register --name imagen-base64 --promote --version 3`" in paragraph


def test_max_mode_and_ties():
    assert decide("m", "3", "eval/clip", "max", Score(31.0), "2", Score(30.0)).decision == PROMOTED
    assert decide("m", "3", "eval/clip", "max", Score(29.0), "2", Score(30.0)).decision == KEPT
    tie = decide("m", "3", "val/loss", "min", Score(0.5, 4), "2", Score(0.5, 4))
    assert tie.decision == KEPT and "a tie does not promote" in tie.reason


def test_close_figures_are_shown_with_the_digits_that_tell_them_apart():
    d = decide("m", "3", "val/loss", "min", Score(0.123401, 4), "2", Score(0.123409, 4))
    assert d.decision == PROMOTED and "0.12340 beats champion v2's 0.12341" in d.reason
    d = decide("m", "3", "val/loss", "min", Score(0.1234561, 4), "2", Score(0.1234564, 4))
    assert "0.1234561 beats champion v2's 0.1234564" in d.reason


def test_first_version_and_already_champion():
    first = decide("m", "1", "val/loss", "min", Score(0.3, 4), None)
    assert first.decision == FIRST and first.promoted and "no champion yet" in first.reason
    assert first.tags()["promotion.champion_version"] == "none"
    assert first.tags()["promotion.champion_value"] == "none"
    # a first version becomes champion even without a figure (data with no validation split)
    assert decide("m", "1", "val/loss", "min", Score(None, why="no split"), None).decision == FIRST
    again = decide("m", "2", "val/loss", "min", Score(None), "2")
    assert again.decision == ALREADY and again.promoted and again.line().endswith("nothing to do")


def test_a_champion_that_cannot_be_scored_keeps_the_challenger():
    d = decide("imagen-base64", "4", "val/loss", "min", Score(0.1, 8), "2",
               Score(None, why="embeddings of encoder B, stage trained on A"))
    assert d.decision == KEPT and "champion v2 cannot be scored on this split: embeddings of encoder B" in d.reason
    assert "imagen-pipeline register --name imagen-base64 --promote --version 4" in d.line()
    no_split = decide("m", "4", "val/loss", "min", Score(None, why="no validation split"), "2")
    assert no_split.decision == KEPT and "no validation split" in no_split.reason
    nan = decide("m", "4", "val/loss", "min", Score(float("nan"), 8), "2", Score(0.1, 8))
    assert nan.decision == KEPT
    other = decide("m", "4", "val/loss", "min", Score(0.1, 8), "2", Score(0.2, 6))
    assert other.decision == KEPT and "not comparable" in other.reason


def stage(name, version, decision, promoted, stage_name):
    return {"name": name, "version": version, "decision": decision, "promoted": promoted, "stage": stage_name}


def test_the_cascade_is_promoted_only_if_each_of_its_stages_is():
    ok = [stage("p-base64", "3", PROMOTED, True, "base64"), stage("p-sr256", "2", ALREADY, True, "sr256")]
    d = decide_cascade("p-cascade", "5", ["base64", "sr256"], ok, "4")
    assert d.decision == PROMOTED and "base64 v3 promoted, sr256 v2 already_champion" in d.reason
    assert d.tags()["promotion.stages"] == "base64 v3 promoted, sr256 v2 already_champion"
    assert "promotion.metric" not in d.tags()
    assert decide_cascade("p-cascade", "1", ["base64", "sr256"], ok, None).decision == FIRST
    held = [ok[0], stage("p-sr256", "3", KEPT, False, "sr256")]
    d = decide_cascade("p-cascade", "5", ["base64", "sr256"], held, "4")
    assert d.decision == KEPT and "sr256 (v3 kept_challenger)" in d.reason
    # a stage of the cascade that was not gated in this run holds it back; one outside it does not
    d = decide_cascade("p-cascade", "5", ["base64", "sr256"], [ok[0], None], "4")
    assert d.decision == KEPT and "sr256 (not gated)" in d.reason
    assert decide_cascade("p-cascade", "5", ["base64"], held, "4").decision == PROMOTED
    assert decide_cascade("p-cascade", "4", ["base64"], held, "4").decision == ALREADY


def test_the_promotion_paragraph_is_appended_once_and_replaced_on_a_new_decision():
    text = "| stage | preset |\n|---|---|\n\nText encoder: `t5`."
    once = with_paragraph(text, f"{HEADING}\n\n**Stays challenger**: a.")
    assert once.startswith(text) and once.endswith("**Stays challenger**: a.")
    twice = with_paragraph(once, f"{HEADING}\n\n**Promoted**: b.")
    assert twice == f"{text}\n\n{HEADING}\n\n**Promoted**: b." and twice.count(HEADING) == 1
    assert with_paragraph(None, f"{HEADING}\n\nx") == f"{HEADING}\n\nx"
    assert with_paragraph(f"{HEADING}\n\nold", f"{HEADING}\n\nnew") == f"{HEADING}\n\nnew"


def test_the_dag_params_take_a_rule_and_a_policy():
    import os
    import sys

    from airflow.sdk.definitions.param import ParamsDict
    from airflow.sdk.exceptions import ParamValidationError

    dags = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "dags")
    sys.path.insert(0, dags)
    try:
        import imagen_common
    finally:
        sys.path.remove(dags)
    for params in (imagen_common.full_params(), imagen_common.stage_params()):
        defaults = ParamsDict(params).validate()
        assert (defaults["promotion"], defaults["promote_on"]) == ("gate", "val/loss")
        assert params["promote_on"].resolve("eval/clip_score:max") == "eval/clip_score:max"
        for bad in ("val/loss:avg", "val/loss\n", "", "a b"):
            with pytest.raises(ParamValidationError):
                params["promote_on"].resolve(bad)
        with pytest.raises(ParamValidationError):
            params["promotion"].resolve("always")
