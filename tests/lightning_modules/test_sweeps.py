"""W&B sweep files (experiments/sweeps/*.yaml): well formed, every parameter a CLI key, and the
command a W&B agent would run trains for a step on the tiny head.

The agent replaces ``${args}`` by ``--<parameter>=<value>`` for the sampled values (Python's str of
the value) and ``${env}`` by ``/usr/bin/env``; :func:`agent_command` does the same here and is
checked against wandb's own expansion.
"""

from __future__ import annotations

import importlib
import math
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from lightning_modules.cli import stage_of
from tests.conftest import EXPERIMENTS, REPO_ROOT, TINY_MESH, run_stage

SWEEPS = EXPERIMENTS / "sweeps"
STAGES = ("distill", "gar")
UPSTREAM_FLAG = {"distill": "--model.init_args.teacher_ckpt", "gar": "--model.init_args.student_ckpt"}


def load_sweep(stage: str) -> dict:
    return yaml.safe_load((SWEEPS / f"{stage}.yaml").read_text())


def sample_parameters(parameters: dict[str, dict], rng: random.Random) -> dict[str, Any]:
    """One draw of every parameter, for the distributions the sweep files use.

    Raises:
        ValueError: a parameter spec this sampler does not know (extend it with the sweep file).
    """
    values = {}
    for name, spec in parameters.items():
        if "value" in spec:
            values[name] = spec["value"]
        elif "values" in spec:
            values[name] = rng.choice(spec["values"])
        elif spec.get("distribution") == "uniform":
            values[name] = rng.uniform(spec["min"], spec["max"])
        elif spec.get("distribution") == "log_uniform_values":
            values[name] = math.exp(rng.uniform(math.log(spec["min"]), math.log(spec["max"])))
        elif spec.get("distribution") == "int_uniform":
            values[name] = rng.randint(spec["min"], spec["max"])
        else:
            raise ValueError(f"sweep parameter {name}: unsupported spec {spec}")
    return values


def agent_command(command: list[str], values: dict[str, Any]) -> list[str]:
    """The argument list the W&B agent runs: ${args} -> --key=value, ${env} -> /usr/bin/env."""
    macros = {"${env}": ["/usr/bin/env"], "${args}": [f"--{key}={value}" for key, value in values.items()]}
    out: list[str] = []
    for part in command:
        if part.startswith("${") and part.endswith("}"):
            if part not in macros:
                raise ValueError(f"macro {part} is not expanded by this test")
            out += macros[part]
        else:
            out.append(part)
    return out


def _same(got: Any, want: Any) -> bool:
    return got == pytest.approx(want) if isinstance(want, float) else got == want


def _dig(tree: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        tree = tree[key]
    return tree


@pytest.mark.parametrize("stage", STAGES)
def test_sweep_file_is_well_formed(stage):
    sweep = load_sweep(stage)
    assert sweep["method"] in ("grid", "random", "bayes")
    command = sweep["command"]
    assert command[:5] == ["${env}", "lightning", "fit", "--config", f"experiments/{stage}.yaml"]
    assert "${args}" in command and (REPO_ROOT / command[4]).is_file()
    # the sweep optimises the metric that selects the stage's best.ckpt
    stage_config = yaml.safe_load((EXPERIMENTS / f"{stage}.yaml").read_text())
    module_name, class_name = stage_config["model"]["class_path"].rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), class_name)
    assert stage_of(stage_config["model"]["class_path"]) == stage
    assert sweep["metric"]["name"] == cls.monitor and sweep["metric"]["goal"] == "maximize"
    assert sweep["parameters"] and all(k.startswith("model.init_args.") for k in sweep["parameters"])


def test_agent_expansion_matches_wandb():
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    values = sample_parameters(load_sweep("gar")["parameters"], random.Random(0))
    ours = agent_command(["${args}"], values)
    theirs = create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})["args"]
    assert ours == theirs


def _print_config(capsys, stage: str, *flags: str) -> tuple[int, dict | None]:
    with pytest.raises(SystemExit) as exit_info:
        run_stage("fit", "--config", str(EXPERIMENTS / f"{stage}.yaml"), *flags, "--print_config")
    out = capsys.readouterr().out
    code = exit_info.value.code or 0
    return code, (yaml.safe_load(out) if code == 0 else None)


@pytest.mark.parametrize("stage", STAGES)
def test_every_sweep_parameter_is_a_cli_key(stage, capsys):
    parameters = load_sweep(stage)["parameters"]
    for seed in range(3):
        values = sample_parameters(parameters, random.Random(seed))
        code, config = _print_config(capsys, stage, *agent_command(["${args}"], values))
        assert code == 0, f"the CLI rejected {values}"
        for key, value in values.items():
            assert _same(_dig(config, key), value), key
    # the check can fail: a key the model lacks is rejected
    code, _ = _print_config(capsys, stage, "--model.init_args.no_such_key=1")
    assert code != 0


@pytest.mark.parametrize("stage", STAGES)
def test_agent_command_trains_a_step(stage, tmp_path, request):
    upstream = request.getfixturevalue({"distill": "teacher_run", "gar": "distill_run"}[stage])
    sweep = load_sweep(stage)
    values = sample_parameters(sweep["parameters"], random.Random(1))
    argv = agent_command(sweep["command"], values)
    assert argv[:2] == ["/usr/bin/env", "lightning"]
    args = [str(REPO_ROOT / a) if a.startswith("experiments/") else a for a in argv[2:]]  # the agent runs in the checkout
    run_dir = tmp_path / "trial"
    cli = run_stage(
        *args, "--config", str(TINY_MESH), UPSTREAM_FLAG[stage], str(Path(upstream) / "checkpoints" / "last.ckpt"),
        f"--trainer.max_steps={3 if stage == 'gar' else 1}", "--run_dir", str(run_dir),
    )
    assert cli.trainer.global_step >= 1 and (run_dir / "checkpoints" / "last.ckpt").is_file()
    hparams = dict(cli.model.hparams)
    for key, value in values.items():  # the sampled values reached the model
        assert _same(_dig(hparams, key.removeprefix("model.init_args.")), value), key
