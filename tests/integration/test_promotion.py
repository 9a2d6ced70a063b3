"""pipeline/release/promotion.py against a real MLflow store (SQLite under the data root, as the
DAG uses it): tiny base64 checkpoints trained in this process on the tiny data with its validation
split, registered, and gated on ``val/loss`` scored in the gate itself.

The ladder is built so that its order cannot flip on another machine's numerics: "fair" and "bad"
are one step at a learning rate far too large (0.1 and 1.0), "better" is 4 ordinary steps (about
0.25; the untrained model scores 0.27). The held-out split changes with the tiny server's port,
and so do these figures: one step at 0.03 scored 0.40 on one split and about 1 on another, too
close to "better" for comfort. An earlier ladder of step-1 against step-4 checkpoints of one run
(0.252 vs 0.232 here) flipped on CI (0.2830 vs 0.2837).

A first version becomes champion; a worse one stays challenger with both figures on it; a better
one is promoted; a rerun changes nothing; the cascade follows its stages; a
champion that cannot be scored on this split (another text encoder) is not replaced; another
metric is read from each version's run. Also: the DAGs' promote tasks follow registration."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.layout import RunLayout
from tests.integration.test_dags import parsed  # noqa: F401  (the DAG files parsed as Airflow does)

STEPS = 4  # ordinary steps of "better" at a global batch of 2
LADDER_LR = {"fair": 0.1, "bad": 1.0}  # one AdamW step moves every weight by about this much


@pytest.fixture(scope="module")
def run(tmp_path_factory, filtered_shards, tiny_embeddings):
    """A data root whose store holds three training runs: base64 (a checkpoint at every step),
    base64 on another text encoder's embeddings, and sr256."""
    from pipeline.data.embed import embed_shards
    from pipeline.dev.tinymodels import build_tiny_t5
    from pipeline.train.job import TrainJob
    from pipeline.train.trainer import Trainer

    root = str(tmp_path_factory.mktemp("promoroot"))
    layout = RunLayout(root)

    def train(stage: str, steps: int, tag: str, embeddings: str = tiny_embeddings, lr: float | None = None) -> str:
        job = TrainJob(stage=stage, preset="tiny", data=filtered_shards, embeddings=embeddings,
                       checkpoint_dir=layout.checkpoints(stage, tag), root=root, max_steps=steps, lr=lr,
                       global_batch=2, sample_every=0, log_every=steps, checkpoint_every=steps, eval_every=0,
                       device="cpu", run_name=f"{stage}-{tag}")
        return Trainer(job, rank=0, world=1, device=torch.device("cpu")).fit()["checkpoint"]

    other = build_tiny_t5(str(tmp_path_factory.mktemp("t5-other")), seed=1)
    other_emb = embed_shards(filtered_shards, str(tmp_path_factory.mktemp("emb-other")), other)["output"]
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # the root's own SQLite store
        ckpts = {tag: train("base64", 1, tag, lr=lr) for tag, lr in LADDER_LR.items()}
        ckpts.update(better=train("base64", STEPS, "main"), sr=train("sr256", 1, "sr"),
                     other=train("base64", 1, "other", other_emb))
        yield {"root": root, "data": filtered_shards, "embeddings": tiny_embeddings, "ckpts": ckpts,
               "other_embeddings": other_emb}


def registered(ckpts: list[str], name: str) -> str:
    from pipeline.release.registry import register

    return register(ckpts, name)["version"]


def gate(run, name: str, version: str, embeddings: str | None = None, **kw) -> dict:
    from pipeline.release.promotion import gate as gate_

    return gate_(name, version, run["data"], embeddings or run["embeddings"], root=run["root"], device="cpu", **kw)


def client(run):
    import mlflow

    return mlflow.MlflowClient(RunLayout(run["root"]).tracking_uri())


def aliases(run, name: str) -> dict[str, str]:
    return {k: str(v) for k, v in client(run).get_registered_model(name).aliases.items()}


def champion(run, name: str) -> str | None:
    return aliases(run, name).get("champion")


def test_first_champion_then_a_worse_one_stays_challenger_then_a_better_one_wins(run, capsys):
    from pipeline.train.validation import score_checkpoint

    name, c = "p-base64", run["ckpts"]
    v1 = registered([c["fair"]], name)
    first = gate(run, name, v1)
    assert first["decision"] == "first_version" and champion(run, name) == v1
    fair_loss = score_checkpoint(c["fair"], run["data"], run["embeddings"])["val/loss"]
    assert first["value"] == pytest.approx(fair_loss, rel=1e-6)  # the registry's copy, the same figure

    v2 = registered([c["bad"]], name)
    worse = gate(run, name, v2)
    assert worse["decision"] == "kept_challenger" and not worse["promoted"]
    assert aliases(run, name) == {"challenger": v2, "champion": v1}
    assert worse["value"] > 10 * worse["champion_value"]  # far apart: no machine's numerics flip them
    assert worse["champion_value"] == pytest.approx(fair_loss, rel=1e-6)  # scored again, here
    mv = client(run).get_model_version(name, v2)
    assert mv.tags["promotion.decision"] == "kept_challenger" and mv.tags["promotion.champion_version"] == v1
    assert float(mv.tags["promotion.value"]) == pytest.approx(worse["value"], rel=1e-6)
    assert float(mv.tags["promotion.champion_value"]) == pytest.approx(fair_loss, rel=1e-6)
    assert mv.tags["promotion.metric"] == "val/loss:min" and int(mv.tags["promotion.samples"]) >= 1
    assert mv.description.startswith("| stage | preset |")  # register's text is kept
    assert "#### Promotion" in mv.description and f"champion v{v1}'s {fair_loss:.4f}" in mv.description
    assert f"register --name {name} --promote --version {v2} --tracking-uri sqlite:///" in mv.description
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"[promote] {name} v{v2}: val/loss ") and "does not beat champion" in line

    gate(run, name, v2)  # decided again: one paragraph, not two
    assert client(run).get_model_version(name, v2).description.count("#### Promotion") == 1

    v3 = registered([c["better"]], name)
    better = gate(run, name, v3)
    assert better["decision"] == "promoted" and champion(run, name) == v3
    assert better["value"] < better["champion_value"] / 2
    assert f"beats champion v{v1}'s" in capsys.readouterr().out

    before = client(run).get_model_version(name, v3)
    again = gate(run, name, v3)  # a rerun on the champion: nothing scored, nothing written
    assert again["decision"] == "already_champion" and champion(run, name) == v3
    after = client(run).get_model_version(name, v3)
    assert (after.tags, after.description) == (before.tags, before.description)


def test_the_cascade_is_promoted_only_when_each_stage_is(run):
    from pipeline.release.promotion import gate_cascade

    c = run["ckpts"]
    base1, sr1 = registered([c["fair"]], "q-base64"), registered([c["sr"]], "q-sr256")
    first = [gate(run, "q-base64", base1), gate(run, "q-sr256", sr1)]
    cas1 = registered([c["fair"], c["sr"]], "q-cascade")
    assert gate_cascade("q-cascade", cas1, first, root=run["root"])["decision"] == "first_version"
    assert champion(run, "q-cascade") == cas1

    base2 = registered([c["bad"]], "q-base64")
    held = [gate(run, "q-base64", base2), gate(run, "q-sr256", sr1)]
    assert [d["decision"] for d in held] == ["kept_challenger", "already_champion"]
    cas2 = registered([c["bad"], c["sr"]], "q-cascade")
    d = gate_cascade("q-cascade", cas2, held, root=run["root"])
    assert d["decision"] == "kept_challenger" and champion(run, "q-cascade") == cas1
    tags = client(run).get_model_version("q-cascade", cas2).tags
    assert tags["promotion.decision"] == "kept_challenger"
    assert tags["promotion.stages"] == f"base64 v{base2} kept_challenger, sr256 v{sr1} already_champion"
    # promoted by hand, the base stage is champion: now the same cascade version follows it
    from pipeline.release.registry import promote

    promote("q-base64", version=base2, tracking_uri=RunLayout(run["root"]).tracking_uri())
    now = [gate(run, "q-base64", base2), gate(run, "q-sr256", sr1)]  # both already champion
    assert gate_cascade("q-cascade", cas2, now, root=run["root"])["decision"] == "promoted"
    assert champion(run, "q-cascade") == cas2


def test_a_champion_that_cannot_be_scored_on_this_split_is_kept(run):
    from pipeline.release import promotion

    name = "r-base64"
    v1 = registered([run["ckpts"]["other"]], name)
    assert gate(run, name, v1, run["other_embeddings"])["decision"] == "first_version"
    v2 = registered([run["ckpts"]["better"]], name)
    d = gate(run, name, v2)  # scored on the tiny T5's embeddings: the champion's encoder differs
    assert d["decision"] == "kept_challenger" and d["value"] is not None and d["champion_value"] is None
    assert f"champion v{v1} cannot be scored on this split" in d["reason"] and "t5-other" in d["reason"]
    assert f"imagen-pipeline register --name {name} --promote --version {v2}" in d["line"]
    assert champion(run, name) == v1
    with pytest.raises(ValueError, match="cannot be scored"):  # the challenger itself: a wrong call
        promotion.gate(name, v2, run["data"], run["other_embeddings"], root=run["root"], device="cpu")


def test_a_metric_logged_on_each_run_through_the_cli(run, capsys):
    """Another metric is read from each version's run, not scored: higher wins with ``:max``."""
    from pipeline.cli import main

    name, c = "s-base64", run["ckpts"]
    v1, v2 = registered([c["other"]], name), registered([c["better"]], name)  # two training runs
    store = client(run)
    for version, value in ((v1, 0.5), (v2, 0.7)):
        store.log_metric(store.get_model_version(name, version).run_id, "eval/custom", value)
    assert gate(run, name, v1, metric="eval/custom:max")["decision"] == "first_version"
    capsys.readouterr()
    assert main(["gate", "--name", name, "--version", v2, "--data", run["data"], "--embeddings",
                 run["embeddings"], "--promote-on", "eval/custom:max", "--root", run["root"]]) == 0
    d = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert d["decision"] == "promoted" and (d["value"], d["champion_value"]) == (0.7, 0.5)
    assert d["line"] == f"[promote] {name} v{v2}: eval/custom 0.7000 beats champion v{v1}'s 0.5000: promoted"
    assert champion(run, name) == v2


def test_promote_tasks_follow_registration(parsed):  # noqa: F811
    full = parsed["dags"]["imagen_full"]["deps"]
    for s in ("base64", "sr256", "sr1024"):
        assert full[f"promote_{s}"] == [f"register_{s}", f"train_{s}"]
    assert full["promote_cascade"] == ["promote_base64", "promote_sr1024", "promote_sr256", "register_cascade"]
    assert parsed["dags"]["imagen_train_stage"]["deps"]["promote"] == ["register", "train"]
