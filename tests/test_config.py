"""Parameters: MLproject, flags and dataclasses agree, and bad values stop a stage in one line."""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from experiments import compare, repeat, tune
from pipeline import evaluate, main, prepare, train
from pipeline.config import (
    EvaluateConfig,
    OneLineParser,
    ParameterError,
    PrepareConfig,
    TrainConfig,
    TuneConfig,
    add_config_arguments,
    build_configs,
    parse_bool,
    user_data_ref,
    user_path,
)
from tests.conftest import REPO, nothing_tracked

MLPROJECT = yaml.safe_load((REPO / "MLproject").read_text())
ENTRY_CONFIGS = {
    "prepare": [PrepareConfig],
    "train": [TrainConfig],
    "evaluate": [EvaluateConfig],
    "main": [PrepareConfig, TrainConfig],
    "repeat": [PrepareConfig, TrainConfig],
    "tune": [TuneConfig, PrepareConfig],
}
MODULES = {"tune": "experiments.tune", "compare": "experiments.compare", "repeat": "experiments.repeat"}


def as_field_type(field: dataclasses.Field, value):
    kind = type(field.default)
    if kind is bool:
        return str(value).lower() == "true"
    return kind(value)


@pytest.mark.parametrize("entry_point", ENTRY_CONFIGS)
def test_mlproject_defaults_equal_the_dataclass_defaults(entry_point):
    spec = MLPROJECT["entry_points"][entry_point]
    for config_type in ENTRY_CONFIGS[entry_point]:
        for field in dataclasses.fields(config_type):
            declared = spec["parameters"][field.name]
            assert declared["type"] == ("float" if type(field.default) in (int, float) else "string"), field.name
            assert as_field_type(field, declared["default"]) == field.default, f"{entry_point}.{field.name}"


@pytest.mark.parametrize("entry_point", [*ENTRY_CONFIGS, "compare"])
def test_every_mlproject_parameter_reaches_its_flag(entry_point):
    spec = MLPROJECT["entry_points"][entry_point]
    command = " ".join(spec["command"].split())
    for name in spec["parameters"]:
        assert f"--{name.replace('_', '-')} {{{name}}}" in command, name
    assert command.startswith(f"python -m {MODULES.get(entry_point, 'pipeline.' + entry_point)} ")


def flag_defaults(module) -> dict:
    """What ``module.main()`` parses from no flags at all: every flag's default."""
    parse_args, built = argparse.ArgumentParser.parse_args, []

    def capture(parser, args=None, namespace=None):
        built.append(parser)
        raise SystemExit

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture), pytest.raises(SystemExit):
        module.main([])
    return vars(parse_args(built[0], []))


@pytest.mark.parametrize("module, entry_point", [(compare, "compare"), (repeat, "repeat")])
def test_mlproject_defaults_equal_the_flag_defaults(module, entry_point):
    defaults = flag_defaults(module)
    for name, declared in MLPROJECT["entry_points"][entry_point]["parameters"].items():
        default = defaults[name]
        as_flag_type = parse_bool if isinstance(default, bool) else type(default)
        assert as_flag_type(str(declared["default"])) == default, f"{entry_point}.{name}"


def test_user_path_reads_a_relative_path_from_the_launch_dir(tmp_path, monkeypatch):
    home = tmp_path.resolve()
    monkeypatch.chdir(home / "..")  # the project folder, say, where `mlflow run` starts a stage
    typed_in = str(home / "work")  # what MLproject's launch_dir gives: where `mlflow run` was typed
    assert user_path("data", typed_in) == str(home / "work" / "data")
    assert user_path("../shared/data", typed_in) == str(home / "shared" / "data")
    assert user_path(str(home / "elsewhere"), typed_in) == str(home / "elsewhere")  # absolute: as given
    monkeypatch.chdir(home)
    assert user_path("data", ".") == str(home / "data")  # --launch-dir's default: the working directory


def test_a_data_reference_that_is_a_folder_is_read_from_the_launch_dir(tmp_path, monkeypatch):
    (tmp_path / "work" / "prepared").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # not where the folder is
    typed_in = str(tmp_path / "work")
    assert user_data_ref("prepared", typed_in) == str((tmp_path / "work" / "prepared").resolve())
    run_id = "0123456789abcdef0123456789abcdef"  # no such folder: a prepare run id, as given
    assert user_data_ref(run_id, typed_in) == run_id
    assert user_data_ref("runs:/0123/prepared", typed_in) == "runs:/0123/prepared"
    assert user_data_ref("", typed_in) == ""  # evaluate's default: the data the model trained on


@pytest.mark.parametrize("config_type", [TrainConfig, EvaluateConfig, TuneConfig])
def test_each_entry_points_data_folder_is_read_from_the_launch_dir(config_type, tmp_path, monkeypatch):
    (tmp_path / "work" / "prepared").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    parser = OneLineParser(prog="stage")
    parser.add_argument("--data", default="")  # as train, evaluate and tune add it
    add_config_arguments(parser, config_type)
    args, _ = build_configs(parser, ["--data", "prepared", "--launch-dir", str(tmp_path / "work")], config_type)
    assert args.data == str((tmp_path / "work" / "prepared").resolve())


def pins(lines) -> dict[str, str]:
    return dict(line.split("==") for line in lines if "==" in line)


def test_requirements_pins_equal_conda_yaml():
    requirements = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    conda = yaml.safe_load((REPO / "conda.yaml").read_text())
    pip_section = next(item["pip"] for item in conda["dependencies"] if isinstance(item, dict))
    assert pins(requirements) == pins(pip_section)
    assert {"torch", "torchvision", "mlflow", "optuna", "pandas", "pytest"} <= set(pins(requirements))


BAD_VALUES = [
    (prepare, ["--val-size", "60000"], "val_size"),
    (prepare, ["--val-size", "0"], "val_size"),
    (prepare, ["--dataset", "cifar10"], "dataset"),
    (prepare, ["--train-limit", "-1"], "train_limit"),
    (train, ["--hidden-size", "0"], "hidden_size"),
    (train, ["--num-layers", "0"], "num_layers"),
    (train, ["--learning-rate", "0"], "learning_rate"),
    (train, ["--learning-rate", "-0.1"], "learning_rate"),
    (train, ["--learning-rate", "nan"], "learning_rate"),
    (train, ["--batch-size", "0"], "batch_size"),
    (train, ["--epochs", "0"], "epochs"),
    (train, ["--epochs", "2.5"], "--epochs"),
    (train, ["--hidden-size", "abc"], "--hidden-size"),
    (train, ["--bidirectional", "maybe"], "--bidirectional"),
    (train, ["--dropout", "0.2", "--num-layers", "1"], "dropout"),
    (train, ["--reading-order", "columns"], "reading_order"),
    (evaluate, ["--batch-size", "0"], "batch_size"),
    (main, ["--hidden-size", "0"], "hidden_size"),
    (main, ["--val-size", "70000"], "val_size"),
    (tune, ["--n-trials", "0"], "n_trials"),
    (tune, ["--n-workers", "0"], "n_workers"),
    (tune, ["--sampler", "grid"], "sampler"),
    (tune, ["--pruner", "always"], "pruner"),
    (tune, ["--confirm-top", "-1"], "confirm_top"),
    (tune, ["--confirm-seeds", "0"], "confirm_seeds"),
    (tune, ["--study", "transformer"], "study"),
    (tune, ["--storage", "/no/such/folder/s.journal"], "storage"),
    (tune, ["--storage", "nosuchdb://u:secret@host/db"], "storage"),
]


@pytest.mark.parametrize("stage, argv, name", BAD_VALUES, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_values_stop_the_stage_with_one_line_before_any_run(stage, argv, name, tracking, capsys):
    required = {train: ["--data", "unused"], evaluate: ["--model", "unused"]}.get(stage, [])
    with pytest.raises(SystemExit) as exit_info:
        stage.main(required + argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert name in err
    assert nothing_tracked(tracking), "a run was started before validation"


def test_error_names_the_allowed_values():
    with pytest.raises(ParameterError, match=r"hidden_size=0 .* >= 1 and <= 4096"):
        TrainConfig(hidden_size=0)
    with pytest.raises(ParameterError, match="one of mnist, fashion-mnist"):
        PrepareConfig(dataset="emnist")


def test_flags_show_their_defaults(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(TrainConfig):
        assert re.search(rf"--{field.name.replace('_', '-')} .*?\(default: {re.escape(str(field.default))}\)", help_text), (
            field.name
        )


values = st.one_of(
    st.integers(-10, 100_000),
    st.floats(allow_nan=True),
    st.booleans(),
    st.text(max_size=8),
    st.sampled_from(["rows", "pixels", "cpu", "cosine"]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from([f.name for f in dataclasses.fields(TrainConfig)]), values, max_size=5))
def test_any_train_config_is_valid_or_rejected_by_name(overrides):
    try:
        config = TrainConfig(**overrides)
    except ParameterError as error:
        assert str(error).split("=")[0] in overrides  # names a parameter that was given
        return
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        assert not isinstance(value, str) or field.metadata["choices"] and value in field.metadata["choices"]
    assert config.hidden_size >= 1 and config.num_layers >= 1 and config.learning_rate > 0 and config.epochs >= 1
    assert not (config.dropout > 0 and config.num_layers == 1)


def test_importing_the_project_changes_no_global_state():
    """No module sets environment variables or a matplotlib backend when imported: only running does."""
    probe = """
import os, sys
before = dict(os.environ)
import mlflow, torch  # their own import-time state is theirs
after_libraries = dict(os.environ)
import experiments.compare, experiments.repeat, experiments.tune
import pipeline.evaluate, pipeline.main, pipeline.prepare, pipeline.train
print(sorted(k for k in os.environ if os.environ.get(k) != after_libraries.get(k)), "matplotlib.pyplot" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.stdout.split() == ["[]", "False"], done.stderr[-2000:]


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    quick_start = readme[readme.index("## Quick start") :].split("```bash\n")[1].split("```")[0].splitlines()
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.startswith("bash setup.sh")]
    assert len(quick_start) == 2 and ci == [quick_start[1]]
