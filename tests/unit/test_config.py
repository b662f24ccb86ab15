"""Config composition and validation: typed schema, one-line errors naming the field, exit 2."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env
from hydra.errors import ConfigCompositionException

from train.config import ConfigError, to_run_config

ROOT = Path(__file__).resolve().parents[2]


def test_every_experiment_and_group_composes(compose_run):
    for overrides in (
        ["experiment=smoke"],
        ["model=gpt_tiny", "moe=top1"],
        ["model=gpt2_small", "moe=top2_dropless", "deepspeed=zero1"],
        ["model=gpt_350m", "moe=dense"],
        # Dropless, DeepSpeed's top-k gate drops nothing: k > 2 is the same model as ours.
        ["moe=top2_dropless", "moe.top_k=3", "moe.implementation=deepspeed"],
    ):
        run = to_run_config(compose_run(overrides))
        assert run.model.hidden_size > 0
    smoke = to_run_config(compose_run(["experiment=smoke"]))
    assert smoke.name == "smoke" and smoke.run_dir == "runs/smoke"


@pytest.mark.parametrize("value, policy", [("always", "always"), ("final", "final"), ("never", "never"),
                                           ("true", "always"), ("false", "never"), ("False", "never")])
def test_portable_checkpoint_takes_a_policy_or_a_boolean(compose_run, value, policy):
    run = to_run_config(compose_run([f"trainer.portable_checkpoint={value}"]))
    assert run.trainer.portable_checkpoint == policy


def test_unknown_key_fails_at_compose(compose_run):
    with pytest.raises(ConfigCompositionException):
        compose_run(["model.hiden_size=3"])
    with pytest.raises(ConfigCompositionException):
        compose_run(["moe.top_k=two"])
    # `+key=value` gets past composition; the schema check catches it, at any depth.
    with pytest.raises(ConfigError, match=r"^\+moe\.topk: no such setting; did you mean moe\.top_k\?$"):
        to_run_config(compose_run(["+moe.topk=2"]))
    with pytest.raises(ConfigError, match=r"^\+foo: no such setting; the config has name, model, moe"):
        to_run_config(compose_run(["+foo=bar"]))


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["moe.top_k=9"], "moe.top_k"),
        (["moe.num_experts=6", "moe.ep_size=4"], "moe.ep_size"),
        (["moe.capacity_factor=0"], "moe.capacity_factor"),
        (["moe.eval_capacity_factor=-1"], "moe.eval_capacity_factor"),
        # A setting the chosen router never reads would be silently ignored.
        (["moe=expert_choice", "moe.bias_update_rate=0.001"], "moe.bias_update_rate=0.001 applies to token choice only"),
        (["moe=top2", "moe.ec_group=sequence"], "moe.ec_group='sequence' applies to expert choice only"),
        # Expert choice has no top-k (a token gets cf experts on average) and no balancing loss.
        (["moe=expert_choice", "moe.top_k=4"], "moe.top_k=4 applies to token choice only"),
        (["moe=expert_choice", "moe.aux_loss_coef=0.1"], "moe.aux_loss_coef=0.1 applies to token choice only"),
        # NaN passes `< 0`; it would reach the loss (or the selection bias) unnoticed.
        (["moe.aux_loss_coef=nan"], "moe.aux_loss_coef must be a finite number >= 0, got nan"),
        (["moe.z_loss_coef=inf"], "moe.z_loss_coef must be a finite number >= 0, got inf"),
        (["moe=top2_auxfree", "moe.bias_update_rate=nan"], "moe.bias_update_rate must be a finite number >= 0, got nan"),
        (["moe.capacity_factor=nan"], "moe.capacity_factor must be > 0"),
        # Nor does the stock DeepSpeed baseline run a model its gate cannot follow.
        (["moe=top2_auxfree", "moe.implementation=deepspeed"],
         "moe.implementation=deepspeed (DeepSpeed's own gate) has no moe.bias_update_rate=0.001"),
        (["moe=expert_choice", "moe.implementation=deepspeed"],
         "moe.implementation=deepspeed (DeepSpeed's own gate) has no moe.router=expert_choice (token choice only)"),
        (["moe.aux_loss_scope=global", "moe.implementation=deepspeed"],
         "moe.implementation=deepspeed (DeepSpeed's own gate) has no moe.aux_loss_scope=global (its balancing loss is per"),
        (["moe.top_k=3", "moe.implementation=deepspeed"],
         "moe.implementation=deepspeed (DeepSpeed's own gate) has no moe.top_k=3 with a capacity (above top-2 it drops by"),
        # Its gate drops in training and eval alike: a dropless run would evaluate dropless, silently.
        (["moe=top2_dropless", "moe.eval_capacity_factor=0.5", "moe.implementation=deepspeed"],
         "moe.implementation=deepspeed (DeepSpeed's own gate) has no moe.eval_capacity_factor=0.5 with dropless training"),
        # Settings of two sections that must agree.
        (["model.tensor_parallel=2", "moe.expert_hidden=33"],
         "moe.expert_hidden=33 must be divisible by model.tensor_parallel=2"),
        (["model.tensor_parallel=2", "moe.shared_expert_hidden=33"],
         "moe.shared_expert_hidden=33 must be divisible by model.tensor_parallel=2"),
        (["moe=dense", "moe.ep_size=2"], "moe.ep_size=2 splits experts, and this model has none (moe.every=0: dense)"),
        (["model.hidden_size=100", "model.num_heads=3"], "model.num_heads"),
        # NaN rotary tables, a square root of a negative, torch's traceback on a negative std.
        (["model.rope_theta=-1"], "model.rope_theta must be a positive finite number, got -1"),
        (["model.rope_theta=nan"], "model.rope_theta must be a positive finite number, got nan"),
        (["model.norm_eps=-1e-5"], "model.norm_eps must be a positive finite number, got -1e-05"),
        (["model.init_std=-0.5"], "model.init_std must be a positive finite number, got -0.5"),
        (["model.num_layers=4", "moe.every=7"], "moe.every=7 puts no MoE layer in model.num_layers=4"),
        (["deepspeed.zero_stage=3"], "deepspeed.zero_stage"),
        (["deepspeed.zero_stage=0"], "wrong gradient norm under expert parallelism"),
        (["deepspeed.precision=fp16"], "deepspeed.precision"),
        # AdamW's settings: a NaN or an out-of-range beta would only show as a diverged run.
        (["deepspeed.lr=nan"], "deepspeed.lr must be a finite number > 0, got nan"),
        (["deepspeed.lr=inf"], "deepspeed.lr must be a finite number > 0, got inf"),
        (["deepspeed.beta2=1.0"], "deepspeed.beta2 must be in [0, 1), got 1.0"),
        (["deepspeed.beta1=-0.1"], "deepspeed.beta1 must be in [0, 1), got -0.1"),
        (["deepspeed.eps=0"], "deepspeed.eps must be a finite number > 0, got 0"),
        (["deepspeed.weight_decay=-0.1"], "deepspeed.weight_decay must be a finite number >= 0, got -0.1"),
        (["deepspeed.grad_clip=nan"], "deepspeed.grad_clip must be a finite number >= 0, got nan"),
        (["deepspeed.warmup_steps=0"], "deepspeed.warmup_steps"),
        (["trainer.micro_batch_size=0"], "trainer.micro_batch_size"),
        (["trainer.seed=4294967296"], "trainer.seed must be in [0, 2**32)"),
        (["data.val_fraction=0.9"], "data.val_fraction"),
        (["trainer.portable_checkpoint=sometimes"], "trainer.portable_checkpoint"),
        # An infinite peak would make every MFU 0.
        (["trainer.peak_tflops=inf"], "trainer.peak_tflops must be a finite number > 0 or null, got inf"),
    ],
)
def test_invalid_values_name_the_field(compose_run, overrides, field):
    with pytest.raises(ConfigError) as error:
        to_run_config(compose_run(overrides))
    message = str(error.value)
    assert field in message and "\n" not in message


@pytest.mark.parametrize("preset", ["h100_350m", "h100_gpt2_small"])
def test_a_presets_routing_can_be_replaced_by_a_moe_choice(compose_run, preset):
    # The presets are dropless by choosing moe=top2_dropless, not by setting fields over whatever
    # moe= the user picks (which made moe=expert_choice fail and moe=top2 silently dropless).
    assert to_run_config(compose_run([f"experiment={preset}"])).moe.capacity_factor is None
    top2 = to_run_config(compose_run([f"experiment={preset}", "moe=top2"])).moe
    assert (top2.capacity_factor, top2.eval_capacity_factor) == (1.25, None)
    expert_choice = to_run_config(compose_run([f"experiment={preset}", "moe=expert_choice"])).moe
    assert (expert_choice.router, expert_choice.capacity_factor) == ("expert_choice", 2.0)


@pytest.mark.parametrize("preset", ["top1", "top2", "top2_auxfree", "top2_dropless", "top2_shared", "expert_choice"])
def test_every_routing_preset_evaluates_causally(compose_run, preset):
    """Validation and moe-eval's `trained` row must not let later tokens change earlier predictions:
    token choice evaluates dropless (a capacity makes a token's expert depend on the batch's other
    tokens), expert choice through its causal thresholds. Capacities at eval remain a choice."""
    moe = to_run_config(compose_run([f"moe={preset}"])).moe
    if moe.router == "token_choice":
        assert moe.eval_capacity_factor is None, preset
    else:
        assert moe.ec_eval_mode == "causal", preset


def test_expert_choice_runs_saved_before_its_preset_changed_still_load():
    # conf/moe/expert_choice.yaml as every expert-choice run before 2026-12-06 recorded it.
    from train.load import run_config_from_dict

    old_preset = {"router": "expert_choice", "num_experts": 8, "top_k": 2, "every": 1, "capacity_factor": 2.0,
                  "eval_capacity_factor": None, "min_capacity": 1, "aux_loss_coef": 0.0, "z_loss_coef": 0.001,
                  "ec_group": "batch", "ec_max_experts_per_token": None, "ec_eval_mode": "causal",
                  "ec_threshold_momentum": 0.05}
    assert run_config_from_dict({"moe": old_preset}, "config.yaml").moe.aux_loss_coef == 0.0


def test_expert_choice_takes_any_expert_count_and_ignores_token_choice_defaults(compose_run):
    # top_k's default (2) is token choice's; it must not stop expert choice over one expert.
    run = to_run_config(compose_run(["moe=expert_choice", "moe.num_experts=1"]))
    assert run.moe.router == "expert_choice" and run.moe.num_experts == 1


@pytest.mark.parametrize(
    "args, expected",
    [
        (["moe.top_k=two"], "moe.top_k: Value 'two' of type 'str' could not be converted to Integer"),
        (["experiment=smoke", "moe.top_k=[", "trainer.max_steps=3"], "'moe.top_k=[' is not a valid override"),
        (["experiment=h200"], "experiment=h200: no such config; experiment is one of h100_350m, h100_gpt2_small, smoke"),
        # A group given null or a number: Hydra raises a bare ValueError for those.
        (["moe=null"], "moe=null: no such config; moe is one of dense, expert_choice, top1, top2,"),
        (["model=5"], "model=5: no such config; model is one of gpt2_small, gpt_350m, gpt_small, gpt_tiny"),
    ],
)
def test_override_problem_is_one_line_naming_the_override(args, expected):
    from train.cli import override_problem

    problem = override_problem(args)
    assert problem is not None and problem.startswith(expected) and "\n" not in problem, problem


def test_override_problem_passes_good_overrides_and_leaves_hydra_flags_to_hydra():
    from train.cli import override_problem

    assert override_problem(["experiment=smoke", "trainer.compile=true", "hydra.run.dir=elsewhere"]) is None
    # A sweep is no single config: with --multirun Hydra parses it, not the preflight.
    assert override_problem(["--multirun", "moe.top_k=1,2"]) is None


def test_an_install_without_the_configs_says_how_to_install(tmp_path, monkeypatch):
    # What a non-editable install looks like: the packages copied, conf/ not beside them.
    from train import cli

    monkeypatch.setattr(cli, "CONF_DIR", str(tmp_path / "site-packages" / "conf"))
    problem = cli.override_problem(["experiment=smoke"])
    assert problem == (f"no configs at {tmp_path / 'site-packages' / 'conf'}: moe-gpt runs from its checkout; "
                       "install it editable there (make install, or pip install -e .)")


def _run_cli(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environment = subprocess_env(PYTHONPATH=str(ROOT), **env)
    return subprocess.run(
        [sys.executable, "-m", "train", *args], cwd=tmp_path, env=environment, capture_output=True, text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args, env, expected",
    [
        (["moe.top_k=9"], {}, "moe.top_k"),
        (["moe.num_experts=8", "moe.ep_size=2"], {"WORLD_SIZE": "3"}, "moe.ep_size=2 must divide the world size 3"),
        (["data=files", "data.files=[missing.txt]"], {}, "data.files: 'missing.txt'"),
        # Without data.files, not a quiet fall-back to the embedded corpus.
        (["data=files"], {}, "data.files: data=files needs the files to train on"),
        # Rejected by Hydra while composing: reported the same way, not as Hydra's several lines.
        (["trainer.compile=maybe"], {}, "trainer.compile: Value 'maybe' is not a valid bool"),
        (["model.hiden_size=3"], {}, "model.hiden_size: Key 'hiden_size' not in 'ModelConfig'"),
        (["moe=top3"], {}, "moe=top3: no such config; moe is one of dense, expert_choice, top1,"),
        (["model="], {}, "model=: no such config; model is one of gpt2_small, gpt_350m,"),
        # An interpolation's message names only its target: the field that holds it is named too.
        (["trainer.max_steps=${nope}"], {}, "trainer.max_steps: Interpolation key 'nope' not found"),
        (["trainer.max_steps=${oc.env:MOE_GPT_NOT_SET}"], {}, "trainer.max_steps: KeyError raised while resolving"),
        # Hydra's `+` adds a key the schema lacks; it would be ignored.
        (["+trainer.max_stepz=5"], {}, "+trainer.max_stepz: no such setting; did you mean trainer.max_steps?"),
        # The launcher sets the number of ranks; world_size only sizes a dry run.
        (["world_size=4"], {}, "world_size=4 plans a dry run (dry_run=true); this run's world size is 1, given by the launcher"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line_and_no_run_dir(tmp_path, args, env, expected):
    result = _run_cli([*args, "trainer.run_dir=run"], tmp_path, **env)
    assert result.returncode == 2, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and expected in error_lines[0], result.stderr
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "run_dir, resume, expected",
    [
        ("taken", "false", "trainer.run_dir='taken': a file; expected a folder path"),
        ("taken/run", "false", "trainer.run_dir='taken/run': taken is not a folder"),
        ("nowhere", "true", "trainer.resume=true but trainer.run_dir='nowhere' does not exist"),
        # An experiment's folder of runs rather than a run: the message names one to pick.
        ("runs/smoke", "true", "runs/smoke/checkpoints holds no checkpoint; it holds runs, e.g. trainer.run_dir=runs/smoke/2"),
    ],
)
def test_a_run_dir_that_cannot_be_used_fails_in_one_line(tmp_path, run_dir, resume, expected):
    (tmp_path / "taken").write_text("a file, not a directory\n")
    for stamp in ("20261201-000000", "20261202-000000"):
        checkpoints = tmp_path / "runs" / "smoke" / stamp / "checkpoints"
        checkpoints.mkdir(parents=True)
        (checkpoints / "latest").write_text("step_00000001\n")
    result = _run_cli(["model=gpt_tiny", f"trainer.run_dir={run_dir}", f"trainer.resume={resume}",
                       f"data.cache_dir={ROOT / '.cache' / 'data'}"], tmp_path)
    assert result.returncode == 2, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and expected in error_lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert (tmp_path / "taken").read_text() == "a file, not a directory\n"


def test_an_unwritable_run_dir_parent_is_named(tmp_path, monkeypatch):
    from train.output_path import unwritable_reason

    # Root may write anywhere, so the check's answer is stood in for (os.access).
    monkeypatch.setattr("os.access", lambda path, mode: Path(path) != tmp_path)
    assert unwritable_reason(tmp_path / "a" / "b", folder=True) == f"{tmp_path} is not writable"
    assert unwritable_reason(tmp_path, folder=True) == f"{tmp_path} is not writable"
    assert unwritable_reason(tmp_path / "a", folder=True) is not None
    monkeypatch.setattr("os.access", lambda path, mode: True)
    assert unwritable_reason(tmp_path / "a" / "b", folder=True) is None


def test_a_run_stopped_before_its_first_save_is_pointed_to_auto_resume(compose_run, tmp_path):
    # Its metrics were written, no save finished: "pass trainer.resume=true" would only lead to
    # "holds no checkpoint". Both lines name the setting that starts it over.
    from train.loop import checked_for_start

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step_00000004").mkdir(parents=True)  # a first save killed part-way
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')

    def start(selection: str):
        return checked_for_start(to_run_config(compose_run(["model=gpt_tiny", f"trainer.run_dir={run_dir}", selection])),
                                 1, "the launcher")

    with pytest.raises(ConfigError, match="saved no complete checkpoint: pass trainer.auto_resume=true to start it over"):
        start("trainer.resume=false")
    with pytest.raises(ConfigError, match=r"holds no checkpoint; trainer.auto_resume=true starts its run over there$"):
        start("trainer.resume=true")
    assert start("trainer.auto_resume=true").trainer.resume is False


@pytest.mark.parametrize("selection", ["trainer.auto_resume=true", "trainer.resume=true"])
def test_a_run_whose_latest_was_deleted_is_not_started_over(compose_run, tmp_path, selection):
    # Starting over among the old tags would end with a resume removing them as unfinished.
    from train.loop import checked_for_start

    checkpoints = tmp_path / "run" / "checkpoints"
    for step, finished in ((10, True), (20, True), (30, False)):  # step 30: a save killed part-way
        (checkpoints / f"step_{step:08d}").mkdir(parents=True)
        if finished:
            (checkpoints / f"step_{step:08d}" / "config.yaml").write_text("{}\n")
    run = to_run_config(compose_run(["model=gpt_tiny", f"trainer.run_dir={tmp_path / 'run'}", selection]))
    expected = (f"{checkpoints} holds step_00000020 but no `latest` naming it: write its name into "
                f"{checkpoints / 'latest'} to continue from it, or choose another trainer.run_dir")
    with pytest.raises(ConfigError) as error:
        checked_for_start(run, 1, "the launcher")
    assert str(error.value).endswith(expected)
    # A first save killed before its last file leaves nothing finished: auto_resume starts over.
    shutil.rmtree(checkpoints / "step_00000010")
    shutil.rmtree(checkpoints / "step_00000020")
    if selection == "trainer.auto_resume=true":
        assert checked_for_start(run, 1, "the launcher").trainer.resume is False
    (checkpoints / "latest").write_text("step_00000030\n")
    assert checked_for_start(run, 1, "the launcher").trainer.resume is True
