"""The one summary block of benchmarks/gpu_check.sh: each step's result against its target.

    python -m benchmarks.gpu_summary --work <gpu_check's work folder> --results <results folder> --budget 480

Reads what the steps left in the work folder (steps.tsv, probe.json, pytest.xml, the benchmarks'
JSON, the study's journal and MLflow store), prints the block, and writes into the results folder
``summary.md`` (the block), ``results.json`` (everything it read, machine-readable), ``study.md``
(one row per trial: parameters, state, val_accuracy, peak GPU memory, GPU utilisation) and the
benchmarks' own tables as ``throughput.md``, ``precision.md``, ``to-accuracy.md``. A step that did
not run or left nothing is said so in its line; nothing here stops the block from printing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import traceback
import xml.etree.ElementTree as ElementTree
from collections import defaultdict
from pathlib import Path

from pipeline.tables import markdown_table

# The targets.
THROUGHPUT_RATIO = 10.0  # project loop / tutorial loop, samples/s, same GPU and configuration
SECONDS_TO_99, STRETCH_SECONDS_TO_99 = 10.0, 5.0  # training time to 99% test accuracy
STUDY_TRIALS, STUDY_SECONDS = 40, 300  # trials counted, seconds of trials
STUDY_NAME = "gpu-check"
GPU_UTILIZATION = "system/gpu_0_utilization_percentage"


def newest(folder: Path, pattern: str) -> Path | None:
    found = sorted(folder.glob(pattern))
    return found[-1] if found else None


def read_steps(work: Path) -> dict[str, dict]:
    """steps.tsv: name, exit status, seconds taken, limit (or 'skipped')."""
    steps = {}
    path = work / "steps.tsv"
    for line in path.read_text().splitlines() if path.exists() else []:
        name, status, seconds, limit = (line.split("\t") + ["", "", "", ""])[:4]
        steps[name] = {"status": status, "seconds": int(seconds or 0), "limit": limit}
    return steps


def step_note(steps: dict, name: str) -> str:
    step = steps.get(name)
    if not step:
        return "did not run"
    if step["status"] == "skipped":
        return f"skipped ({step['limit']})"
    if step["status"] in ("124", "137"):
        return f"stopped at its limit of {step['limit']} s"
    return f"exit {step['status']} after {step['seconds']} s" if step["status"] != "0" else f"{step['seconds']} s"


def verdict(met: bool, by: str) -> str:
    return f"met ({by})" if met else f"MISSED ({by})"


def against(value: float, target: float, unit: str, *, at_most: bool, spec: str = ".1f") -> str:
    """``value`` checked against a ``target`` it must reach (or, ``at_most``, not pass): met (+1.2 s against <= 10 s)."""
    met = value <= target if at_most else value >= target
    return verdict(met, f"{value - target:+{spec}}{unit} against {'<=' if at_most else '>='} {target:.0f}{unit}")


# --- the sections ---------------------------------------------------------------------------------


def tests_section(work: Path, steps: dict) -> tuple[list[str], dict]:
    path = work / "pytest.xml"
    if not path.exists():
        return [f"GPU tests: no report ({step_note(steps, 'tests')})"], {}
    cases = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped":
                outcome = "skipped: " + child.get("message", "")
        properties = {p.get("name"): p.get("value") for p in case.iter("property")}
        cases.append(
            {"name": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0)), "properties": properties}
        )
    counts = defaultdict(int)
    for case in cases:
        counts[case["outcome"].split(":")[0]] += 1
    line = f"GPU tests: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped of {len(cases)}"
    if counts["skipped"] == len(cases) and cases:
        line += f" ({cases[0]['outcome'].split(': ', 1)[-1]})"
    elif cases:
        line += ": " + verdict(counts["passed"] == len(cases), "all must pass")
    lines = [line] + [f"  FAILED {case['name']}" for case in cases if case["outcome"] == "failed"]
    bf16 = next((case["properties"] for case in cases if "bf16_samples_per_second" in case["properties"]), None)
    if bf16:
        lines.append(
            f"  bf16 test: {bf16['bf16_samples_per_second']} vs fp32 {bf16['fp32_samples_per_second']} samples/s, "
            f"val_accuracy {bf16['bf16_val_accuracy']} vs {bf16['fp32_val_accuracy']} (tests ran side by side)"
        )
    return lines, {"cases": cases}


def probe_section(work: Path, steps: dict) -> tuple[list[str], dict]:
    path = work / "probe.json"
    if not path.exists():
        return [f"probe: nothing recorded ({step_note(steps, 'probe')})"], {}
    probe = json.loads(path.read_text())
    env = probe["environment"]
    where = env.get("gpu_name") or env["device"]
    lines = [
        f"device: {where}"
        + (
            f", capability {env['gpu_capability']}, {env['gpu_memory_gb']} GB, driver {env.get('driver')}"
            if env.get("gpu_name")
            else ""
        )
        + f"; torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn_version']} "
        f"({'enabled' if env['cudnn_enabled'] else 'DISABLED'})"
    ]
    for row in probe["measurements"]:
        label = f"h{row['hidden_size']}-l{row['num_layers']}-b{row['batch_size']} {row['precision']}"
        if "error" in row:
            lines.append(f"  LSTM {label}: {row['error'][:120]}")
            continue
        memory = f", peak {row['peak_memory_mb']:.0f} MB" if "peak_memory_mb" in row else ""
        kernels = row.get("rnn_kernels") or row.get("top_kernels")
        kernel = f"; kernel {kernels[0][:70]}" if kernels else ""
        lines.append(
            f"  LSTM {label}: {row['lstm_path']} path, {row['ms_per_step']:.2f} ms/step, "
            f"{row['samples_per_second']:,} samples/s{memory}{kernel}"
        )
    return lines, probe


def precision_section(work: Path, steps: dict) -> tuple[list[str], dict]:
    """benchmarks/precision.py's headline lines (its bold ones), whatever else its report holds."""
    path = newest(work / "precision", "precision-*.md")
    if not path:
        return [f"bf16 vs fp32: no result ({step_note(steps, 'precision')})"], {}
    headlines = [line.strip().strip("*") for line in path.read_text().splitlines() if line.startswith("**")]
    json_path = path.with_suffix(".json")
    report = json.loads(json_path.read_text()) if json_path.exists() else {}
    if not headlines:
        return [f"bf16 vs fp32: no comparison in {path.name} ({step_note(steps, 'precision')})"], report
    return ["bf16 vs fp32 (benchmarks.precision): " + headlines[0], *[f"  {line}" for line in headlines[1:]]], report


def throughput_section(work: Path, steps: dict) -> tuple[list[str], dict]:
    path = newest(work / "bench", "throughput-*.json")
    if not path:
        return [f"throughput: no result ({step_note(steps, 'throughput')})"], {}
    report = json.loads(path.read_text())
    lines = ["throughput, project loop vs tutorial loop (samples/s, median):"]
    for row in report["rows"]:
        if row["loop"] != "project":
            continue
        baseline = next(r for r in report["rows"] if r["config"] == row["config"] and r["loop"] == "baseline")
        ratio = row["ratio_to_baseline"]
        memory = f", peak {row['cuda_peak_mib']:.0f} MiB" if row.get("cuda_peak_mib") else ""
        lines.append(
            f"  {row['config']}: {row['samples_per_second']['median']:,.0f} vs {baseline['samples_per_second']['median']:,.0f}"
            f" = {ratio:.1f}x{memory}: {against(ratio, THROUGHPUT_RATIO, 'x', at_most=False)}"
        )
    return lines, report


def to_accuracy_section(work: Path, steps: dict) -> tuple[list[str], dict]:
    path = newest(work / "to-accuracy", "to-accuracy-*.json")
    if not path:
        return [f"time to {0.99:.0%} test accuracy: no result ({step_note(steps, 'to_accuracy')})"], {}
    report = json.loads(path.read_text())
    target, reached = report["target"], report.get("reached")
    lines = []
    if reached:
        seconds = reached["train_seconds"]
        lines.append(
            f"time to {target:.2%} test accuracy: {seconds:.1f} s of training ({reached['config']}, {reached['epochs']} "
            f"epochs, test_accuracy {reached['test_accuracy']:.4f}): "
            f"{against(seconds, SECONDS_TO_99, ' s', at_most=True)}; "
            f"stretch {against(seconds, STRETCH_SECONDS_TO_99, ' s', at_most=True)}"
        )
    else:
        best = max(report["rows"], key=lambda row: row["test_accuracy"], default=None)
        lines.append(
            f"time to {target:.2%} test accuracy: MISSED, not reached ({step_note(steps, 'to_accuracy')})"
            + (f"; best {best['test_accuracy']:.4f} ({best['config']}, {best['epochs']} epochs)" if best else "")
        )
    for candidate in report.get("candidates", []):
        mine = [row for row in report["rows"] if row["config"] == candidate["config"]]
        if candidate["reached"]:
            what = f"{candidate['reached']['train_seconds']:.1f} s ({candidate['reached']['epochs']} epochs)"
        else:
            what = "not reached" + (f", best test_accuracy {max(r['test_accuracy'] for r in mine):.4f}" if mine else "")
        speed = f", {mine[-1]['samples_per_second']:,.0f} samples/s" if mine else ""
        lines.append(f"  {candidate['config']}: {what}{speed}")
    return lines, report


def study_section(work: Path, steps: dict, results: Path) -> tuple[list[str], dict]:
    journal = work / "study.journal"
    if not journal.exists():
        return [f"study: nothing ran ({step_note(steps, 'study')})"], {}
    import optuna
    from mlflow.tracking import MlflowClient
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from experiments.coordination import counted

    study = optuna.load_study(study_name=STUDY_NAME, storage=JournalStorage(JournalFileBackend(str(journal))))
    trials = study.get_trials(deepcopy=False)
    done = counted(trials)
    states = defaultdict(int)
    for trial in done:
        states[trial.state.name] += 1
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in done if t.datetime_complete]
    span = (max(ends) - min(starts)).total_seconds() if starts and ends else None
    workers = {t.user_attrs.get("worker") for t in trials if t.user_attrs.get("worker")}
    met = len(done) >= STUDY_TRIALS and span is not None and span <= STUDY_SECONDS
    span_text = f"{span:.0f} s" if span is not None else "no trial finished"
    timeout_file = work / "study_timeout"
    started_for = int(timeout_file.read_text()) if timeout_file.exists() else None
    notes = []
    if started_for is not None and started_for < STUDY_SECONDS:
        notes.append(f"trials could start for {started_for} s of the budget")
    if not met and span:
        notes.append(f"at that rate {len(done) / span * STUDY_SECONDS:.0f} trials in {STUDY_SECONDS} s")
    if steps.get("study", {}).get("status") != "0":
        notes.append(f"step {step_note(steps, 'study')}")
    lines = [
        f"study: {len(done)} trials counted in {span_text} ({states['COMPLETE']} complete, {states['PRUNED']} pruned, "
        f"{states['FAIL']} failed), {len(workers)} worker process(es); "
        + verdict(met, f"{len(done) - STUDY_TRIALS:+d} trials against >= {STUDY_TRIALS} in {STUDY_SECONDS} s")
        + (f" ({'; '.join(notes)})" if notes else "")
    ]
    registered = study.user_attrs.get("registered")
    if registered:
        lines.append(
            f"  registered {registered['name']} version {registered['version']} from trial {registered['trial']}: "
            f"val_accuracy {registered['val_accuracy']:.4f}, test_accuracy {registered['test_accuracy']:.4f}"
        )
    else:
        best = max((t for t in done if t.value is not None), key=lambda t: t.value, default=None)
        lines.append(
            "  nothing registered (the study's summary did not run)"
            + (f"; best trial {best.number}, val_accuracy {best.value:.4f}" if best else "")
        )

    rows, samples = trial_rows(MlflowClient(), trials)
    by_second = defaultdict(list)  # concurrent trials sample the same GPU: average within each second first
    for timestamp, value in samples:
        by_second[timestamp // 1000].append(value)
    utilization = [statistics.fmean(values) for values in by_second.values()]
    if utilization:
        lines.append(
            f"  GPU utilisation while trials ran: mean {statistics.fmean(utilization):.0f}%, median "
            f"{statistics.median(utilization):.0f}% over {len(utilization)} s sampled (MLflow system metrics of the trial runs)"
        )
    else:
        lines.append(f"  GPU utilisation: no {GPU_UTILIZATION} in the trial runs")
    peaks = [row for row in rows if row.get("peak_gpu_memory_mb") is not None]
    if peaks:
        low, high = min(peaks, key=lambda r: r["peak_gpu_memory_mb"]), max(peaks, key=lambda r: r["peak_gpu_memory_mb"])
        lines.append(
            f"  peak GPU memory per trial: {low['peak_gpu_memory_mb']:.0f} MB ({low['config']}) to "
            f"{high['peak_gpu_memory_mb']:.0f} MB ({high['config']}), median "
            f"{statistics.median(r['peak_gpu_memory_mb'] for r in peaks):.0f} MB (study.md has every trial)"
        )
    write_study_table(results / "study.md", rows, lines)
    return lines, {
        "trials": rows,
        "span_seconds": span,
        "states": dict(states),
        "registered": registered,
        "gpu_utilization_by_second": utilization,
    }


def trial_rows(client, trials) -> tuple[list[dict], list[tuple[int, float]]]:
    """One row per trial with an MLflow run, and every GPU-utilisation sample of those runs."""
    rows, samples = [], []
    for trial in trials:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if not run_id:
            continue
        run = client.get_run(run_id)
        params = run.data.params
        history = client.get_metric_history(run_id, GPU_UTILIZATION)
        samples += [(m.timestamp, m.value) for m in history]
        config = (
            f"h{params.get('hidden_size')}-l{params.get('num_layers')}-b{params.get('batch_size')}"
            + (" bi" if params.get("bidirectional") == "true" else "")
            + f" {params.get('resolved_precision', '')}".rstrip()
        )
        rows.append(
            {
                "trial": trial.number,
                "state": trial.state.name,
                "config": config,
                "learning_rate": float(params["learning_rate"]) if "learning_rate" in params else None,
                "dropout": params.get("dropout"),
                "val_accuracy": trial.value,
                "peak_gpu_memory_mb": run.data.metrics.get("peak_gpu_memory_mb"),
                "gpu_utilization_mean": statistics.fmean(m.value for m in history) if history else None,
                "seconds": (trial.datetime_complete - trial.datetime_start).total_seconds()
                if trial.datetime_complete and trial.datetime_start
                else None,
                "worker": trial.user_attrs.get("worker"),
            }
        )
    return rows, samples


def write_study_table(path: Path, rows: list[dict], lines: list[str]) -> None:
    def cell(value, spec=""):
        return "" if value is None else format(value, spec)

    table = [
        {
            "trial": r["trial"],
            "state": r["state"],
            "config": r["config"],
            "learning_rate": cell(r["learning_rate"], ".3g"),
            "val_accuracy": cell(r["val_accuracy"], ".4f"),
            "peak GPU MB": cell(r["peak_gpu_memory_mb"], ".0f"),
            "GPU util %": cell(r["gpu_utilization_mean"], ".0f"),
            "seconds": cell(r["seconds"], ".1f"),
            "worker": r["worker"],
        }
        for r in rows
    ]
    columns = ["trial", "state", "config", "learning_rate", "val_accuracy", "peak GPU MB", "GPU util %", "seconds", "worker"]
    path.write_text("# The GPU check's study\n\n" + "\n".join(lines) + "\n\n" + markdown_table(table, columns=columns) + "\n")


# --- the block ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="gpu_check.sh's work folder")
    parser.add_argument("--results", type=Path, required=True, help="where summary.md and the rest go")
    parser.add_argument("--budget", type=int, default=480, help="seconds the whole check may take (default: 480)")
    parser.add_argument("--elapsed", type=int, default=0, help="seconds the check has taken so far")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="toy sizes: the targets mean nothing")
    args = parser.parse_args(argv)

    steps = read_steps(args.work)
    results, lines = {"steps": steps}, []
    sections = [
        ("tests", lambda: tests_section(args.work, steps)),
        ("probe", lambda: probe_section(args.work, steps)),
        ("precision", lambda: precision_section(args.work, steps)),
        ("throughput", lambda: throughput_section(args.work, steps)),
        ("to_accuracy", lambda: to_accuracy_section(args.work, steps)),
        ("study", lambda: study_section(args.work, steps, args.results)),
    ]
    for name, section in sections:
        try:
            section_lines, results[name] = section()
        except Exception as error:  # one broken section must not hide the others
            section_lines, results[name] = (
                [f"{name}: could not summarise ({type(error).__name__}: {error})"],
                {"error": traceback.format_exc()},
            )
        lines += section_lines
    for name, pattern, target in (
        ("bench", "throughput-*.md", "throughput.md"),
        ("precision", "precision-*.md", "precision.md"),
        ("to-accuracy", "to-accuracy-*.md", "to-accuracy.md"),
    ):
        if found := newest(args.work / name, pattern):
            shutil.copy(found, args.results / target)

    lines.append(
        f"whole check: {args.elapsed} s: {against(args.elapsed, args.budget, ' s', at_most=True, spec='d')}; "
        "steps " + ", ".join(f"{name} {step_note(steps, name)}" for name in steps)
    )
    title = f"GPU check summary ({args.device}{', QUICK: toy sizes, the targets mean nothing' if args.quick else ''})"
    block = "\n".join([f"==== {title} " + "=" * max(4, 100 - len(title)), *lines, f"results: {args.results}", "=" * 106])
    (args.results / "summary.md").write_text(block + "\n")
    (args.results / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(block)


if __name__ == "__main__":
    main()
