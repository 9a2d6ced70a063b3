"""Promotion as a gate: a new registered version (``@challenger``) becomes ``@champion`` only when
it beats the current champion of its model on the same validation split, both measured here, in
this one call.

    from pipeline.release.promotion import gate, gate_cascade
    d = gate("imagen-base64", "3", "ROOT/filtered", "ROOT/embeddings/ENC")   # val/loss, lower wins
    # [promote] imagen-base64 v3: val/loss 0.1234 beats champion v2's 0.1400: promoted
    gate_cascade("imagen-cascade", "2", [d, ...])   # promoted only if each of its stages is champion
    imagen-pipeline gate --name imagen-base64 --version 3 --data ROOT/filtered --embeddings DIR   # by hand

The DAGs call :func:`gate_trained` (task ``promote_<stage>``, after ``register_<stage>``) and
:func:`gate_cascade` (task ``promote_cascade``).

How a stage version is judged (``val/loss``, the default): the champion's weights are fetched
from the registry (``models:/NAME@champion``), the challenger's from its version, and both are
scored by ``pipeline.train.validation.score_checkpoint`` on the held-out split of the same
filtered data with the same embeddings, the same fixed timesteps and the same per-sample noise,
over the same number of samples. A figure logged by an earlier run on another split is never
compared. Lower wins; a tie does not promote. A first version (no champion) becomes champion; a
version that already is champion is left alone (a rerun changes nothing). When the champion
cannot be scored on this split (another text encoder, another image size, no validation
sample for its stage), the challenger stays challenger and the reason says how to promote it
by hand (``imagen-pipeline register --name NAME --promote --version V --tracking-uri URI``).
The champion is read again after scoring; if it moved meanwhile (another run promoted one), the
scores are taken again against the new one.

Another metric (``metric="eval/clip_score:max"``, as the CLI's ``--promote-on``): each
version's value is read from the run it was registered from (else its version tag of that
name); such figures were measured when each run was evaluated, not in this call.

Every decision is recorded on the version: tags ``promotion.decision`` (promoted,
kept_challenger, first_version), ``promotion.metric``, ``promotion.value``,
``promotion.champion_version``, ``promotion.champion_value``, ``promotion.samples``,
``promotion.reason`` (a cascade: ``promotion.stages``), and a "Promotion" paragraph at the end of
its description (an earlier one replaced, the rest kept). The alias moves last, so a crash in
between is decided again by the next run. A version that already is champion is not written to.
Each decision prints one line.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

CHAMPION = "champion"
VAL_LOSS = "val/loss"
PROMOTED, KEPT, FIRST, ALREADY = "promoted", "kept_challenger", "first_version", "already_champion"
CHAMPION_AFTER = frozenset({PROMOTED, FIRST, ALREADY})  # decisions that leave the version champion
HEADING = "#### Promotion"  # the description's promotion paragraph starts here, at its end
TAG = "promotion."
_OUTCOME = {PROMOTED: "promoted", KEPT: "stays challenger", FIRST: "promoted (first version)",
            ALREADY: "nothing to do"}


@dataclasses.dataclass(frozen=True)
class Score:
    """One version's figure, or why there is none."""

    value: float | None
    samples: int | None = None  # validation samples it was measured on (val/loss)
    why: str = ""


@dataclasses.dataclass(frozen=True)
class Decision:
    """What the gate did with one version, with both figures."""

    name: str
    version: str
    decision: str  # PROMOTED | KEPT | FIRST | ALREADY
    reason: str  # the figures, in words: "val/loss 0.1234 beats champion v2's 0.1400"
    metric: str = ""  # "val/loss:min"; empty for a cascade
    value: float | None = None
    champion_version: str | None = None
    champion_value: float | None = None
    stage: str | None = None  # the stage of a stage model
    samples: int | None = None
    stages: dict[str, str] | None = None  # a cascade: {stage: "v3 promoted"}
    store: str = ""  # the registry's tracking URI, for the hint

    @property
    def promoted(self) -> bool:
        """The version is champion after this decision."""
        return self.decision in CHAMPION_AFTER

    @property
    def hint(self) -> str:
        if self.decision != KEPT:
            return ""
        store = f" --tracking-uri {self.store}" if self.store else ""
        return (f"to promote it anyway: imagen-pipeline register --name {self.name} --promote "
                f"--version {self.version}{store}")

    def line(self) -> str:
        hint = f" ({self.hint})" if self.hint else ""
        return f"[promote] {self.name} v{self.version}: {self.reason}: {_OUTCOME[self.decision]}{hint}"

    def tags(self) -> dict[str, str]:
        tags = {"decision": self.decision, "reason": self.reason[:4000]}
        if self.metric:
            tags.update(metric=self.metric, value=_tag(self.value), champion_value=_tag(self.champion_value))
        tags["champion_version"] = self.champion_version or "none"
        if self.samples is not None:
            tags["samples"] = str(self.samples)
        if self.stages is not None:
            tags["stages"] = ", ".join(f"{s} {d}" for s, d in self.stages.items())
        return {TAG + k: v for k, v in tags.items()}

    def paragraph(self) -> str:
        """The description's promotion paragraph (markdown)."""
        text = f"**{_OUTCOME[self.decision].capitalize()}**: {self.reason}."
        if self.metric.startswith(VAL_LOSS) and self.champion_value is not None:
            text += (f" Both versions were scored in the same gate on the same {self.samples} held-out "
                     "samples, with the same fixed timesteps and noise.")
        if self.hint:
            text += f" To promote it anyway: `{self.hint.split(': ', 1)[1]}`."
        return f"{HEADING}\n\n{text}"

    def as_dict(self) -> dict[str, Any]:
        """For XCom and the CLI: the fields, plus ``promoted`` and the printed ``line``."""
        return {**dataclasses.asdict(self), "promoted": self.promoted, "line": self.line()}


def _tag(value: float | None) -> str:
    return "none" if value is None else f"{value:.8g}"


def parse_rule(metric: str = VAL_LOSS, mode: str | None = None) -> tuple[str, str]:
    """(metric, "min" | "max") from "METRIC[:min|max]" as ``--promote-on`` writes it. Without a
    mode: lower wins for a loss or FID, higher for anything else (the CLI's default)."""
    name, _, suffix = (metric or VAL_LOSS).partition(":")
    mode = mode or suffix or ("min" if any(w in name.lower() for w in ("loss", "fid")) else "max")
    if mode not in ("min", "max") or not name:
        raise ValueError(f"promotion metric {metric!r} (mode {mode!r}): write METRIC, METRIC:min or "
                         "METRIC:max, e.g. val/loss or eval/clip_score:max")
    return name, mode


def _fmt(a: float, b: float | None = None) -> tuple[str, str]:
    """Both figures at 4 decimals, or more when that is what tells them apart."""
    for digits in range(4, 10):
        sa, sb = f"{a:.{digits}f}", "" if b is None else f"{b:.{digits}f}"
        if b is None or sa != sb or a == b:
            return sa, sb
    return f"{a!r}", f"{b!r}"


def decide(name: str, version: str, metric: str, mode: str, challenger: Score, champion_version: str | None,
           champion: Score | None = None, stage: str | None = None) -> Decision:
    """The decision on ``version`` against the champion, from the two figures alone."""
    common = {"name": name, "version": str(version), "metric": f"{metric}:{mode}", "value": challenger.value,
              "champion_version": champion_version, "stage": stage, "samples": challenger.samples}
    if champion_version == str(version):
        return Decision(decision=ALREADY, reason="already champion", **common)
    shown = "no figure" if challenger.value is None else f"{metric} {_fmt(challenger.value)[0]}"
    if champion_version is None:
        why = f" ({challenger.why})" if challenger.value is None and challenger.why else ""
        return Decision(decision=FIRST, reason=f"{shown}{why}, no champion yet", **common)
    champ = champion or Score(None, why="not scored")
    common["champion_value"] = champ.value
    if challenger.value is None or math.isnan(challenger.value):
        return Decision(decision=KEPT, reason=f"it has no {metric} to compare: {challenger.why or 'NaN'}",
                        **common)
    if champ.value is None or math.isnan(champ.value):
        return Decision(decision=KEPT, reason=f"{shown}, but champion v{champion_version} cannot be scored "
                        f"on this split: {champ.why or 'NaN'}", **common)
    if challenger.samples != champ.samples:
        return Decision(decision=KEPT, reason=f"{shown} on {challenger.samples} samples, champion "
                        f"v{champion_version}'s on {champ.samples}: not comparable", **common)
    new, old = _fmt(challenger.value, champ.value)
    if challenger.value == champ.value:
        return Decision(decision=KEPT, reason=f"{metric} {new} ties champion v{champion_version}'s {old} "
                        "(a tie does not promote)", **common)
    better = challenger.value < champ.value if mode == "min" else challenger.value > champ.value
    verb = "beats" if better else "does not beat"
    return Decision(decision=PROMOTED if better else KEPT,
                    reason=f"{metric} {new} {verb} champion v{champion_version}'s {old}", **common)


def decide_cascade(name: str, version: str, stages: list[str], stage_decisions: list[dict[str, Any] | None],
                   champion_version: str | None) -> Decision:
    """A cascade version is promoted only if each of its ``stages`` is champion after this run's
    decisions (``Decision.as_dict()`` of each stage model; None for a stage not run)."""
    by_stage = {d["stage"]: d for d in stage_decisions if d and d.get("stage")}
    summary = {s: f"v{by_stage[s]['version']} {by_stage[s]['decision']}" if s in by_stage else "not gated"
               for s in stages}
    common = {"name": name, "version": str(version), "champion_version": champion_version, "stages": summary}
    if champion_version == str(version):
        return Decision(decision=ALREADY, reason="already champion", **common)
    held = [f"{s} ({summary[s]})" for s in stages if not (s in by_stage and by_stage[s]["promoted"])]
    if not stages:
        return Decision(decision=KEPT, reason="its version names no stages (tag `stages`)", **common)
    if held:
        return Decision(decision=KEPT, reason=f"not every stage is champion: {', '.join(held)}", **common)
    every = ", ".join(f"{s} {summary[s]}" for s in stages)
    if champion_version is None:
        return Decision(decision=FIRST, reason=f"every stage is champion ({every}), no champion yet", **common)
    return Decision(decision=PROMOTED, reason=f"every stage is champion ({every}); it replaces "
                    f"v{champion_version}", **common)


def with_paragraph(description: str | None, paragraph: str) -> str:
    """``description`` with ``paragraph`` at its end, in place of an earlier promotion paragraph."""
    kept = (description or "").split(f"\n{HEADING}\n", 1)[0]
    kept = "" if kept.startswith(f"{HEADING}\n") else kept.rstrip()
    return f"{kept}\n\n{paragraph}" if kept else paragraph


# --- the registry -------------------------------------------------------------------------------

def _client(tracking_uri: str | None, root: str | None):
    import mlflow

    from pipeline.release.loading import tracking_store
    from pipeline.tracking import check_store

    mlflow.set_tracking_uri(check_store(tracking_store(tracking_uri, root), "gate"))
    return mlflow.MlflowClient()


def _store() -> str:
    """The tracking URI for a command given in a hint (no user or password in it)."""
    from urllib.parse import urlsplit

    import mlflow

    uri = mlflow.get_tracking_uri()
    parts = urlsplit(uri)
    if parts.username or parts.password:
        uri = parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")).geturl()
    return uri


def _champion(client, name: str) -> str | None:
    version = (client.get_registered_model(name).aliases or {}).get(CHAMPION)
    return None if version is None else str(version)  # the SQLite store gives an int


def _version(client, name: str, version: str):
    from pipeline.release.loading import check_model_uri

    check_model_uri(f"models:/{name}/{version}")  # a one-line LookupError naming what exists
    return client.get_model_version(name, version)


def _record(client, d: Decision) -> None:
    """Tags and description first, the alias last: a crash in between is decided again."""
    for key, value in d.tags().items():
        client.set_model_version_tag(d.name, d.version, key, value)
    current = client.get_model_version(d.name, d.version).description
    client.update_model_version(d.name, d.version, description=with_paragraph(current, d.paragraph()))
    if d.decision in (PROMOTED, FIRST):
        client.set_registered_model_alias(d.name, CHAMPION, d.version)


def _spec_and_limit(weights: str) -> tuple[Any, int]:
    from imagen.checkpoint import load_config
    from pipeline import storage

    cfg = load_config(weights, storage)[0]
    return cfg.spec, cfg.train.eval_samples


def _val_loss(uri: str, data: str, embeddings: str, spec: Any, limit: int, batch_size: int, device: str,
              strict: bool) -> tuple[Score, Any]:
    """``uri``'s one stage scored on the validation split; (Score, its stage spec). ``strict``:
    a ValueError (embeddings of another encoder) is raised, else recorded as the reason."""
    from pipeline.release.loading import model_files
    from pipeline.train.validation import score_checkpoint

    with model_files(uri, progress=False) as files:
        if len(files.stage_dirs) != 1:
            raise ValueError(f"{uri} holds {len(files.stage_dirs)} stages: gate() scores a stage model; "
                             "a cascade is judged by its stages' decisions (gate_cascade)")
        weights = files.stage_dirs[0]
        own_spec, own_limit = _spec_and_limit(weights)
        if spec is not None and own_spec != spec:
            return Score(None, why=f"it is another stage shape ({own_spec}) than the challenger ({spec})"), own_spec
        try:
            m = score_checkpoint(weights, data, embeddings, limit=limit or own_limit, batch_size=batch_size,
                                 device=device)
        except ValueError as e:
            if strict:
                raise ValueError(f"{uri} cannot be scored on {data} with {embeddings}: {e}") from None
            return Score(None, why=str(e).splitlines()[0]), own_spec
    if not m:
        return Score(None, why=f"the validation split of {data} has no sample for its stage (data filtered "
                               "before the split existed: rerun the filter step)"), own_spec
    return Score(float(m[VAL_LOSS]), int(m["val/samples"])), own_spec


def _logged(client, name: str, version: str, metric: str) -> Score:
    """A metric from the run the version was registered from, else its version tag."""
    mv = client.get_model_version(name, version)
    if mv.run_id:
        value = client.get_run(mv.run_id).data.metrics.get(metric)
        if value is not None:
            return Score(float(value))
    if mv.tags.get(metric) is not None:
        return Score(float(mv.tags[metric]))
    return Score(None, why=f"neither its run {mv.run_id} nor its tags hold {metric}: evaluate it first "
                           "(imagen-pipeline evaluate), or gate on val/loss")


def _device(device: str | None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def gate(name: str, version: str | int, data: str, embeddings: str, metric: str = VAL_LOSS, mode: str | None = None,
         *, tracking_uri: str | None = None, root: str | None = None, limit: int | None = None,
         batch_size: int = 16, device: str | None = None) -> dict[str, Any]:
    """Promote ``name`` version ``version`` to ``@champion`` if it beats the current champion
    (see the module docstring); record the decision on the version and print it.

    ``data``: the filtered shards (ROOT/filtered) whose validation split both are scored on;
    ``embeddings``: their embeddings directory. ``metric``: "val/loss" (scored here) or another
    "METRIC[:min|max]" read from each version's run. ``limit``: validation samples scored (default:
    the challenger's ``eval_samples``, for both). ``tracking_uri`` / ``root``: the registry (default:
    the current one; ``root``: that data root's store). Returns ``Decision.as_dict()``.
    """
    from pipeline.data.loader import validation_shards_exist

    metric, mode = parse_rule(metric, mode)
    client, version = _client(tracking_uri, root), str(version)
    stage = _version(client, name, version).tags.get("stages")
    device = _device(device)
    for _ in range(3):
        champion = _champion(client, name)
        if champion == version:
            d = decide(name, version, metric, mode, Score(None), champion, stage=stage)
            print(d.line(), flush=True)
            return d.as_dict()
        if metric != VAL_LOSS:
            mine = _logged(client, name, version, metric)
            theirs = _logged(client, name, champion, metric) if champion else None
        elif not validation_shards_exist(data):
            mine, theirs = Score(None, why=f"{data} has no validation split (val-NNNNNN.tar; filtered before "
                                           "it existed): rerun the filter step"), None
        else:
            mine, spec = _val_loss(f"models:/{name}/{version}", data, embeddings, None, limit, batch_size,
                                   device, strict=True)
            # the champion on exactly the samples the challenger was scored on: the first N of the split
            theirs = _val_loss(f"models:/{name}@{CHAMPION}", data, embeddings, spec, limit or mine.samples,
                               batch_size, device, strict=False)[0] if champion and mine.value is not None else None
        if _champion(client, name) == champion:
            break
        print(f"[promote] {name}: the champion moved while scoring; scoring again", flush=True)
    d = dataclasses.replace(decide(name, version, metric, mode, mine, champion, theirs, stage=stage),
                            store=_store())
    _record(client, d)
    print(d.line(), flush=True)
    return d.as_dict()


def gate_cascade(name: str, version: str | int, stage_decisions: list[dict[str, Any] | None], *,
                 tracking_uri: str | None = None, root: str | None = None) -> dict[str, Any]:
    """Promote the cascade version only if each of its stages (its version tag ``stages``) was
    promoted, or already is champion, by ``stage_decisions`` (:func:`gate` results of this run);
    record the decision the same way. Returns ``Decision.as_dict()``."""
    client, version = _client(tracking_uri, root), str(version)
    stages = [s for s in (_version(client, name, version).tags.get("stages") or "").split(",") if s]
    d = dataclasses.replace(decide_cascade(name, version, stages, list(stage_decisions), _champion(client, name)),
                            store=_store())
    if d.decision != ALREADY:
        _record(client, d)
    print(d.line(), flush=True)
    return d.as_dict()


def gate_trained(trained: dict[str, Any], registered: dict[str, Any], metric: str = VAL_LOSS,
                 device: str | None = None) -> dict[str, Any]:
    """:func:`gate` for an orchestrator task: the version ``register_trained`` returned, judged on
    the data and embeddings the training summary ``trained`` names (else the root's own), in
    the tracking store of its root."""
    from pipeline.data.embed import resolve_embeddings_dir
    from pipeline.layout import RunLayout

    layout = RunLayout(trained["root"])
    data = trained.get("data") or layout.filtered
    embeddings = trained.get("embeddings") or resolve_embeddings_dir(layout.embeddings_root)
    return gate(registered["name"], registered["version"], data, embeddings, metric, root=layout.root,
                device=device)
