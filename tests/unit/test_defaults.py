"""Every default has one source. The train, embed, download and filter options are declared
once, in ``TrainJob``, ``EmbedConfig``, ``DownloadConfig`` and ``FilterConfig``: their fields
generate the CLI flags, the preset overrides are ``TrainConfig`` fields, and the DAG Params
reuse or equal them. The planner's copies of other steps' defaults (it may not import
img2dataset or Airflow) equal their owners'."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import typing

import pytest

from imagen.config import TrainConfig
from pipeline import cli, plan
from pipeline.data.download import DownloadConfig
from pipeline.data.embed_config import EmbedConfig
from pipeline.data.filter_config import FilterConfig
from pipeline.options import flag_of, option_fields
from pipeline.release.evaluate import EvalOptions
from pipeline.train.job import TrainJob, preset_overrides, resolve_config

# Trigger-form defaults that are the DAGs' own, not a step's: why each differs.
DAG_OWN = {
    "root": "the form's root is IMAGEN_DATA_ROOT; the CLI's --root defaults to the folder holding --data",
}




def verb_actions(verb: str) -> dict[str, argparse.Action]:
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in sub.choices[verb]._actions}


@pytest.mark.parametrize(("verb", "cls"), [("train", TrainJob), ("embed", EmbedConfig),
                                           ("download", DownloadConfig), ("filter", FilterConfig),
                                           ("evaluate", EvalOptions)])
def test_cli_flags_are_generated_from_the_config_fields(verb, cls):
    actions = verb_actions(verb)
    for f in option_fields(cls):
        a = actions[f.name]
        assert a.option_strings == [flag_of(f)] and a.help == f.metadata["help"] and a.help
        if f.default is dataclasses.MISSING:
            assert a.required
        else:
            assert a.default == f.default and not a.required
        assert a.choices == f.metadata.get("choices")


def test_the_flags_users_type_keep_their_names():
    assert {"--stage", "--preset", "--data", "--embeddings", "--checkpoint-dir", "--max-steps", "--global-batch",
            "--lr", "--warmup-steps", "--micro-batch", "--optimizer", "--parallel", "--precision",
            "--gradient-checkpointing", "--compile", "--checkpoint-every", "--keep-checkpoints", "--log-every",
            "--sample-every", "--resume", "--tracking-uri", "--experiment", "--run-name", "--num-workers",
            "--device", "--seed"} <= {s for a in verb_actions("train").values() for s in a.option_strings}
    assert {"--input", "--output", "--encoder", "--max-length", "--batch-size", "--max-batch-tokens", "--shards",
            "--num-workers", "--worker", "--device", "--dtype"} <= {
        s for a in verb_actions("embed").values() for s in a.option_strings}


def test_preset_overrides_are_trainconfig_fields_and_all_apply():
    job_types, cfg_types = typing.get_type_hints(TrainJob), typing.get_type_hints(TrainConfig)
    names = preset_overrides()
    assert len(names) == 13
    for name in names:
        assert job_types[name] == cfg_types[name] | None, name  # same type, None = the preset's
    values = {name: (0.5 if cfg_types[name] is float else 7 + i) for i, name in enumerate(names)}
    values["lr_schedule"] = "constant"  # the tiny preset's is cosine
    job = TrainJob(stage="base64", preset="tiny", data="d", embeddings="e", checkpoint_dir="c", **values)
    cfg = resolve_config(job, {"dim": 32, "encoder_name": "t", "max_length": 16})
    assert {name: getattr(cfg.train, name) for name in names} == values


def test_dag_params_equal_the_step_defaults(common):
    params = {**common.full_params(), **common.stage_params()}
    fields = {f.name: f for cls in (TrainJob, EmbedConfig) for f in option_fields(cls)}
    checked = []
    for name, param in params.items():
        f = fields.get(name)
        if f is None or name in DAG_OWN or f.default is dataclasses.MISSING:
            continue  # not a step option, the form's own default, or required on the command line
        assert param.value == f.default, f"DAG Param {name}={param.value!r}, the step's default {f.default!r}"
        checked.append(name)
    assert {"encoder", "preset", "max_steps"} <= set(checked)
    assert set(DAG_OWN) <= set(params)


def test_filtered_shard_size_has_one_value(common):
    from pipeline.data.filters import filter_shards

    default = inspect.signature(filter_shards).parameters["samples_per_shard"].default
    assert common.data_params()["filtered_shard_size"].value == default
    assert verb_actions("filter")["samples_per_shard"].default == default


def test_download_and_filter_flags_show_their_configs_defaults():
    download, filter_ = verb_actions("download"), verb_actions("filter")
    for cls, actions in ((DownloadConfig, download), (FilterConfig, filter_)):
        for f in option_fields(cls):
            assert actions[f.name].default == getattr(cls(), f.name), f.name
    assert {"url_col", "number_sample_per_shard", "encode_format", "distributor"} <= set(download)
    assert {"min_caption_chars", "near_dup_distance", "val_fraction", "dedup"} <= set(filter_)
    assert (DownloadConfig().threads, DownloadConfig().retries) == (8, 0)  # the CLI once said 16 and 1


def test_plan_flags_show_planinputs_defaults():
    parser = argparse.ArgumentParser()
    plan.add_arguments(parser)
    actions = {a.dest: a for a in parser._actions}
    inputs = plan.PlanInputs(samples=1, mean_tokens=1.0)
    for name in ("encoder", "gpu", "nodes", "gpus_per_node", "encode_format", "optimizer", "download_cores"):
        assert actions[name].default == getattr(inputs, name), name
    assert tuple(actions["stages"].default) == inputs.stages


def test_the_planners_copies_equal_their_owners(common):
    from airflow.configuration import conf

    from pipeline.data.filters import filter_shards

    assert DownloadConfig().number_sample_per_shard == plan.RAW_PER_SHARD
    assert DownloadConfig().encode_format == plan.DOWNLOAD_FORMAT
    assert inspect.signature(filter_shards).parameters["samples_per_shard"].default == plan.FILTERED_PER_SHARD
    assert common.embed_params()["embed_shards_per_task"].value == plan.EMBED_SHARDS_PER_TASK
    assert int(conf.get_default_value("core", "max_map_length")) == plan.MAX_MAP_LENGTH
    assert EmbedConfig().max_length == plan.MAX_TOKENS


def test_the_planner_imports_no_step_at_module_level():
    with open(plan.__file__) as f:
        tree = ast.parse(f.read())
    names = [a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in tree.body if isinstance(n, ast.ImportFrom)]
    heavy = [n for n in names if n.split(".")[0] in ("img2dataset", "airflow", "torch", "transformers")
             or n in ("pipeline.data.download", "pipeline.data.filters", "pipeline.data.embed")]
    assert not heavy
