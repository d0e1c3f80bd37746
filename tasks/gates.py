"""Stage 5: export the model, then the evaluation gates that stop a run which isn't learning.

When every gate passes, the export is logged once to the lineage's MLflow run and registered as `fidel-<lang>`
with the alias `candidate`. Checkpoints stay where they are; the run references them by path."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from fidel_tts.tasks.report import StageFailed, logger, publish
from fidel_tts.tasks.spec import RunSpec
from fidel_tts.tasks.tracking import CANDIDATE_ALIAS, Tracker, log_export_model, register_export
from fidel_tts.trainer.checkpoints.export import export_model, read_export_record
from fidel_tts.trainer.data.loader import training_data
from fidel_tts.trainer.data.parquet import ParquetPairs
from fidel_tts.trainer.evaluation.gates import (
    advisory_failures,
    all_passed,
    exported_base_rows_identical,
    finite,
    first_failure,
    inference_smoke,
    new_row_ids,
    new_rows_learning,
    new_rows_of,
    not_diverging,
    reasons_markdown,
    report_markdown,
    validation_improves,
    verdict,
)
from fidel_tts.trainer.evaluation.generate import DEFAULT_DECODE, decode_validation, trained_model
from fidel_tts.trainer.model.weights import torch_load
from fidel_tts.trainer.training.build import build_model
from fidel_tts.trainer.training.hooks import TrainResult
from prefect import task
from prefect.cache_policies import NO_CACHE

RenderAudio = Callable[[list[int], Path], None]  # writes the codes as a listenable .wav at the path


class GatesFailed(StageFailed):
    """The lineage trained to its end but a gate failed: it is finished, and not a candidate."""


def lineage_language(spec: RunSpec) -> str:
    """The target language: the commonest one of the train pairs the data stage kept (a `PATH::lang` suffix or
    the records' field)."""
    dataset = ParquetPairs([data_dir_of(spec) / "train.parquet"])
    counts = Counter(language for language in dataset.column("language") if language)
    return counts.most_common(1)[0][0] if counts else "xx"


def data_dir_of(spec: RunSpec) -> Path:
    """The Parquet dataset the first stage built and training read (also when it was prepared from audio)."""
    return Path(spec.output_dir) / "data"


@task(name="evaluation-gates", cache_policy=NO_CACHE)
def evaluation_gates(spec: RunSpec, result: TrainResult, tracker: Tracker | None,
                     render_audio: RenderAudio | None = None) -> dict:
    export_dir = Path(spec.output_dir) / "export" / f"step{result.step:08d}"
    exported = read_export_record(export_dir) or export_model(result.checkpoint, export_dir).record
    history = result.val_history
    start, end = history[0], history[-1]
    losses = {**{k: v for k, v in result.last_train.items() if k.endswith("_loss")},
              **{k: v for k, v in end.items() if k.endswith("_loss")}}
    tc = spec.train_config()
    val_total = [h["val_text_loss"] * tc.text_loss_weight + h["val_mel_loss"] * tc.mel_loss_weight for h in history]
    results = [
        exported_base_rows_identical(spec.base_checkpoint, export_dir / "gpt.pth", result.lineage["base_rows"]),
        finite(losses),
        not_diverging(val_total),
        validation_improves(start["val_mel_loss"], end["val_mel_loss"], name="validation_improves_mel"),
        validation_improves(start["val_text_loss"], end["val_text_loss"], name="validation_improves_text"),
    ]
    (learning, smoke), smoke_extra = learning_and_smoke(spec, result, str(data_dir_of(spec)), render_audio)
    # advisory unless the run file sets enforce_inference_smoke: short runs (tests, the demo) don't stop yet
    smoke.advisory = not spec.enforce_inference_smoke
    results += [learning, smoke]
    publish("gates", report_markdown(results), {"gates": [r.to_dict() for r in results], "export": exported,
                                                "verdict": verdict(results), **smoke_extra},
            spec.output_dir, tracker, details=reasons_markdown(results))
    if tracker is not None and smoke_extra.get("wav"):
        tracker.log_artifact(smoke_extra["wav"], "smoke")
    for r in results:
        logger().info(r.line())
    passed = all_passed(results)
    if tracker is not None:
        tracker.set_tags({f"gate.{r.name}": r.label() for r in results})
        advisory = advisory_failures(results)
        tracker.set_tags({"gates": "PASS" if passed else "FAIL",
                          "gates.advisory": f"FAIL: {', '.join(advisory)}" if advisory else "none failed",
                          "export.dir": str(export_dir),
                          "export.gpt_sha256": exported["gpt_sha256"]})
    if not passed:
        reason = first_failure(results)
        if tracker is not None:
            tracker.set_tags({"gates.failed": reason})
        raise GatesFailed(reason)
    registered = None
    if tracker is not None:
        name = f"fidel-{lineage_language(spec)}"
        final = {k: v for k, v in {**result.last_train, **end}.items() if k.startswith(("train_", "val_"))}
        model_id = log_export_model(tracker, export_dir, name, result.step, final)
        version = register_export(tracker, name, model_id)
        registered = {"name": name, "version": version, "alias": CANDIDATE_ALIAS}
        tracker.set_tags({"registered_model": f"{name} v{version} @{CANDIDATE_ALIAS}"})
        logger().info("registered %s version %s with alias %s", name, version, CANDIDATE_ALIAS)
    return {"gates": [r.to_dict() for r in results], "export_dir": str(export_dir), "export": exported,
            "registered_model": registered}


def gate_tagger(tracker: Tracker | None):
    """An on_results callback for trainer.evaluation.gates.validation_hook: each gate's result, and the first failure,
    tagged on the lineage's MLflow run."""

    def on_results(step: int, results: list) -> None:
        try:
            log = logger()
        except Exception:  # noqa: BLE001 - outside a Prefect run (the CLI's experimental resume)

            log = logging.getLogger("fidel.gates")
        for r in results:
            log.info("step %d: %s", step, r.line())
        if tracker is None:
            return
        tags = {f"gate.{r.name}": r.label() for r in results}
        reason = first_failure(results)
        if reason:
            tags.update({"gates": "FAIL", "gates.failed": f"step {step}: {reason}"})
        tracker.set_tags(tags, wait=False)  # called from the training loop; flushed when training returns

    return on_results


SMOKE_TEXTS = 4


def learning_and_smoke(spec: RunSpec, result: TrainResult, data_dir: str | None = None,
                       render_audio: RenderAudio | None = None) -> tuple[list, dict]:
    """The end-of-run gates that need the model: new rows learning (rows of the new tokens in the train data moved
    from their replayed init) and the inference smoke (greedy decoding with a KV cache of a few validation texts).
    With a render_audio hook (the demo passes its codec), one decoded sentence is also written as a .wav."""
    tc = spec.train_config(Path(data_dir) if data_dir else None)
    init = build_model(tc)
    b = init.base_rows
    final = torch_load(result.checkpoint)["model"]
    data = training_data(tc.train_manifests, tc.val_manifests, tc.batch_size, tc.seed, tokenizer=tc.tokenizer)
    used = new_row_ids([data.train_set[i].text_ids for i in range(len(data.train_set))], b)
    learning = new_rows_learning(new_rows_of(dict(init.model.state_dict()), b), new_rows_of(final, b), used)
    decoded = decode_validation(trained_model(tc, result.checkpoint), data.val_set, SMOKE_TEXTS,
                                decode=DEFAULT_DECODE)
    smoke = inference_smoke([(len(g.codes), g.stopped, ref) for g, ref in decoded], decode=DEFAULT_DECODE)
    extra = {"smoke": [{"codes": len(g.codes), "stopped": g.stopped, "reference": ref} for g, ref in decoded],
             "decode": DEFAULT_DECODE}
    if render_audio is not None and decoded and decoded[0][0].codes:
        wav = Path(spec.output_dir) / "smoke" / f"val0_step{result.step:08d}.wav"
        wav.parent.mkdir(parents=True, exist_ok=True)
        render_audio(decoded[0][0].codes, wav)
        extra["wav"] = str(wav)
    return [learning, smoke], extra
