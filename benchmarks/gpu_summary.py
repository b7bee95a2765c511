"""The one summary block of benchmarks/gpu_check.sh: each step's result against its target, from what the
steps left in its work folder. Writes ``summary.md`` (the block), ``results.json``, ``study.md`` (one row
per trial) and the benchmarks' own tables. A step that left nothing readable says so in its line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import traceback
import xml.etree.ElementTree as ElementTree
from functools import partial
from pathlib import Path

import optuna
import pandas as pd
from mlflow.tracking import MlflowClient
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from experiments import attributes
from experiments.trials import counted
from pipeline.tables import markdown_table

THROUGHPUT_RATIO = 10.0  # the targets: project loop / tutorial loop, samples/s, same GPU and configuration
SECONDS_TO_99, STRETCH_SECONDS_TO_99 = 10.0, 5.0  # training time to 99%
STUDY_TRIALS, STUDY_SECONDS = 40, 300  # trials counted, seconds of trials
STUDY_TEST_ACCURACY = 0.99  # the registered champion's, tested once
GPU_UTILIZATION = "system/gpu_0_utilization_percentage"
OUTPUTS = {"bench": "throughput.md", "precision": "precision.md", "to-accuracy": "to-accuracy.md"}  # work folder -> result


def newest_json(folder: Path) -> dict:
    return json.loads(sorted(folder.glob("*.json"))[-1].read_text())


def against(value: float, target: float, unit: str, at_most: bool) -> str:
    """``met (+1.2 s against <= 10 s)`` or ``MISSED (...)``."""
    met = value <= target if at_most else value >= target
    return f"{'met' if met else 'MISSED'} ({value - target:+.1f}{unit} against {'<=' if at_most else '>='} {target:.0f}{unit})"


def tests(work: Path) -> list[str]:
    cases = list(ElementTree.parse(work / "pytest.xml").getroot().iter("testcase"))
    outcomes = pd.Series({case.get("name"): next((c.tag for c in case if c.tag != "properties"), "passed") for case in cases})
    ran = outcomes[outcomes != "skipped"]
    verdict = f": {'met' if (ran == 'passed').all() else 'MISSED'} (all must pass)" if len(ran) else ""
    lines = [f"GPU tests: {outcomes.value_counts().to_dict()} of {len(cases)}{verdict}"]
    lines += [f"  FAILED {name}" for name in ran.index[ran != "passed"]]
    return lines + [f"  {p.get('name')}: {p.get('value')}" for case in cases for p in case.iter("property")]  # bf16 vs fp32


def probe(work: Path) -> list[str]:
    report = json.loads((work / "probe.json").read_text())
    env = report["environment"]
    gpu = f", capability {env['gpu_capability']}, {env['gpu_memory_gb']} GB" if "gpu_name" in env else ""
    lines = [
        f"device: {env.get('gpu_name', env['cpu'])}{gpu}; torch {env['torch_version']}, CUDA {env.get('cuda_version')}, "
        f"cuDNN {env['cudnn_version']} ({'enabled' if env['cudnn_enabled'] else 'DISABLED'})"
    ]
    for r in report["measurements"]:
        what = f"  LSTM h{r['hidden_size']}-l{r['num_layers']}-b{r['batch_size']} {r['precision']}: "
        lines.append(
            what + r["error"][:120]
            if "error" in r
            else what + f"{r['lstm_path']} path, {r['ms_per_step']:.2f} ms/step, {r['samples_per_second']:,} samples/s, "
            f"peak {r.get('peak_memory_mb', 0):.0f} MB"
        )
    return lines


def to_accuracy(work: Path, folder: str) -> list[str]:
    """benchmarks/to_accuracy.py's report: each candidate's schedule, chosen on validation and tested once."""
    report = newest_json(work / folder)
    lines = [
        f"  {r['config']}: {r['epochs']} epochs, {r['train_seconds']:.1f} s, {r['samples_per_second']:,.0f} samples/s, "
        f"best_val_accuracy {r['val_accuracy']:.4f}, test_accuracy {r['test_accuracy']:.4f}"
        for r in report["rows"]
        if r.get("chosen")
    ]
    if folder == "precision":
        return ["bf16 vs fp32 (benchmarks.to_accuracy --precisions fp32 bf16):", *lines]
    if not (reached := report["reached"]):
        return [f"time to {report['target']} validation accuracy: MISSED, no candidate reached it", *lines]
    seconds, head = reached["train_seconds"], f"time to {report['target']} validation accuracy"
    return [
        f"{head}: {seconds:.1f} s of training ({reached['config']}, {reached['epochs']} epochs; test_accuracy "
        f"{reached['test_accuracy']:.4f}, tested once): {against(seconds, SECONDS_TO_99, ' s', True)}; "
        f"stretch {against(seconds, STRETCH_SECONDS_TO_99, ' s', True)}",
        *lines,
    ]


def throughput(work: Path) -> list[str]:
    rows = pd.DataFrame(newest_json(work / "bench")["rows"]).query("loop == 'project'")
    return ["throughput, project loop vs tutorial loop (samples/s, median):"] + [
        f"  {r.config}: {r.samples_per_second:,.0f} = {r.ratio_to_baseline:.1f}x the tutorial's, CUDA peak "
        f"{r.cuda_peak_mib or 0:.0f} MiB: {against(r.ratio_to_baseline, THROUGHPUT_RATIO, 'x', at_most=False)}"
        for r in rows.itertuples()
    ]


def study(work: Path, results: Path) -> list[str]:
    study = optuna.load_study(study_name="gpu-check", storage=JournalStorage(JournalFileBackend(str(work / "study.journal"))))
    trials, client, samples, rows = study.get_trials(deepcopy=False), MlflowClient(), [], []
    for trial in (t for t in trials if attributes.RUN_ID.read(t)):
        history = client.get_metric_history(attributes.RUN_ID.read(trial), GPU_UTILIZATION)
        samples += [(m.timestamp // 1000, m.value) for m in history]  # trials side by side sample the same GPU
        peak = client.get_run(attributes.RUN_ID.read(trial)).data.metrics.get("peak_gpu_memory_mb")
        rows.append({"trial": trial.number, "state": trial.state.name, **trial.params, "val_accuracy": trial.value})
        rows[-1] |= {"peak GPU MB": peak, "worker": attributes.WORKER.read(trial)}
    done = counted(trials)
    ends = [t.datetime_complete for t in done if t.datetime_complete]
    span = (max(ends) - min(t.datetime_start for t in trials if t.datetime_start)).total_seconds() if ends else 0
    met = len(done) >= STUDY_TRIALS and 0 < span <= STUDY_SECONDS
    states = pd.Series([t.state.name for t in done], dtype=str).value_counts().to_dict()
    per_second = pd.DataFrame(samples, columns=["second", "value"]).groupby("second").value.mean()
    peaks = pd.DataFrame(rows, columns=["peak GPU MB"])["peak GPU MB"].dropna()
    registered = attributes.REGISTERED.read(study)
    workers = len({attributes.WORKER.read(t) for t in trials} - {None})
    lines = [
        f"study: {len(done)} trials counted in {span:.0f} s {states}, {workers} "
        f"worker(s), trials could start for {(work / 'study_timeout').read_text().strip()} s: "
        f"{'met' if met else 'MISSED'} (>= {STUDY_TRIALS} in {STUDY_SECONDS} s)",
        registered_line(registered) if registered else "  nothing registered (the study's summary did not run): MISSED",
        f"  GPU utilisation while trials ran: mean {per_second.mean():.0f}%, median {per_second.median():.0f}% over "
        f"{len(per_second)} s; peak GPU memory per trial {peaks.min():.0f} to {peaks.max():.0f} MB (study.md has every trial)",
    ]
    (results / "study.md").write_text("# The GPU check's study\n\n" + "\n".join(lines) + "\n\n" + markdown_table(rows) + "\n")
    return lines


def registered_line(registered: dict) -> str:
    """The study's registered model against the target: the champion, at or above 99% test accuracy."""
    role = "the champion" if registered["champion"] else f"not the champion ({registered['why_not_champion']})"
    met = registered["champion"] and registered["test_accuracy"] >= STUDY_TEST_ACCURACY
    return (
        f"  registered {registered['name']} version {registered['version']} from trial {registered['trial']}, {role}: "
        f"val_accuracy {registered['val_accuracy']:.4f}, test_accuracy {registered['test_accuracy']:.4f}: "
        f"{'met' if met else 'MISSED'} (the champion at >= {STUDY_TEST_ACCURACY} test_accuracy)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="gpu_check.sh's work folder")
    parser.add_argument("--results", type=Path, required=True, help="where summary.md and the rest go")
    parser.add_argument("--budget", type=int, default=480, help="seconds the whole check may take (default: 480)")
    parser.add_argument("--elapsed", type=int, default=0, help="seconds the check has taken so far (default: 0)")
    parser.add_argument("--device", default="cuda", help="what the check ran on (default: cuda)")
    parser.add_argument("--quick", action="store_true", help="toy sizes: the targets mean nothing")
    args = parser.parse_args(argv)
    steps = pd.read_csv(args.work / "steps.tsv", sep="\t", names=["step", "status", "seconds", "limit"], dtype=str)
    notes = {s.step: f"exit {s.status} after {s.seconds} s (limit {s.limit})" for s in steps.itertuples()}  # 124, 137: the limit
    notes |= {s.step: "skipped: no time left" for s in steps.itertuples() if s.status == "skipped"}
    sections = [("probe", probe), ("tests", tests), ("precision", partial(to_accuracy, folder="precision"))]
    sections += [("throughput", throughput), ("to_accuracy", partial(to_accuracy, folder="to-accuracy"))]
    sections += [("study", partial(study, results=args.results))]
    lines, errors = [], {}
    for name, section in sections:
        try:
            lines += section(args.work)
        except Exception as error:  # one step that left nothing readable must not hide the others
            lines.append(f"{name}: nothing to summarise ({notes.get(name, 'did not run')}; {type(error).__name__}: {error})")
            errors[name] = traceback.format_exc()
    for folder, name in OUTPUTS.items():
        for found in sorted((args.work / folder).glob("*.md"))[-1:]:
            shutil.copy(found, args.results / name)
    lines.append(f"whole check: {args.elapsed} s: {against(args.elapsed, args.budget, ' s', at_most=True)}")
    lines += [f"  {name}: {note}" for name, note in notes.items()]
    title = f"GPU check summary ({args.device}{', QUICK: toy sizes, the targets mean nothing' if args.quick else ''})"
    block = "\n".join([f"==== {title} " + "=" * max(4, 100 - len(title)), *lines, f"results: {args.results}", "=" * 106])
    (args.results / "summary.md").write_text(block + "\n")
    (args.results / "results.json").write_text(json.dumps({"steps": notes, "summary": lines, "errors": errors}, indent=2) + "\n")
    print(block)


if __name__ == "__main__":
    main()
