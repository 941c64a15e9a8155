"""Typed configs: every shipped YAML validates; mistakes fail at start with the key and the choices."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pixart_lightning.cli import main
from pixart_lightning.config import PRECISIONS, ConfigError, StageConfig, load_saved, load_stage, to_yaml
from pixart_lightning.config.schema import literal_fields
from pixart_lightning.diffusion import SAMPLERS
from pixart_lightning.runner.chain import plan

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_the_readme_override_example_runs_the_micro_batch_it_gives() -> None:
    """configs/README.md's `make stage2 ... RUN_ARGS="..."` example: its data.batch_size is the micro-batch run,
    not a smaller divisor of the per-device share with more accumulation steps."""
    (example,) = [line for line in (CONFIGS / "README.md").read_text().splitlines() if "RUN_ARGS=" in line]
    overrides = example.split('RUN_ARGS="', 1)[1].rstrip('"').split()
    cfg = load_stage(CONFIGS / "pixart-xl2", 2, overrides)
    assert cfg.batch_plan().micro == cfg.data.batch_size


@pytest.mark.parametrize("folder", sorted(p.name for p in CONFIGS.iterdir() if p.is_dir()))
def test_shipped_configs_validate(folder: str) -> None:
    """Each config folder plans all its units, in stage order from stage 1 or from a checkpoint (``model.init_from``),
    and builds each unit's model config."""
    units = plan(CONFIGS / folder)
    stages = [u.stage for u in units]
    assert stages == sorted(stages) and (stages[:2] == [1, 2] or units[0].cfg.model.init_from)
    for unit in units:
        model = unit.cfg.pixart_config(caption_channels=32)
        assert model.mode == ("class" if unit.stage == 1 else "text")


def test_paper_recipe_stage3_phases() -> None:
    """pixart-xl2: stage 3 runs 256 px, then 512 and 1024 px in buckets with micro-conditions."""
    phases = [u for u in plan(CONFIGS / "pixart-xl2") if u.stage == 3]
    assert [(u.phase, u.cfg.data.resolution, u.cfg.data.multi_scale) for u in phases] == [
        ("256px", 256, False), ("512px", 512, True), ("1024px", 1024, True)]
    assert phases[2].dir.parts[-2:] == ("stage3", "1024px")
    assert phases[2].cfg.pixart_config().micro_conditions and phases[2].cfg.optim.lr == 2e-5


def test_unknown_key_names_valid_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrr'; valid keys there: lr, scale_lr"):
        load_stage(CONFIGS / "demo", 1, ["optim.lrr=1"])


def test_wrong_type_and_bad_choice() -> None:
    with pytest.raises(ConfigError, match="optim.lr"):
        load_stage(CONFIGS / "demo", 1, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="diffusion.prediction='x0': valid choices are epsilon, v"):
        load_stage(CONFIGS / "demo", 2, ["diffusion.prediction=x0"])


def test_resolution_must_fit_patch_and_vae() -> None:
    with pytest.raises(ConfigError, match=r"^stage 3: command line: data.resolution=50 is not divisible by patch size"):
        load_stage(CONFIGS / "demo", 3, ["data.resolution=50"])


def test_stage_scoped_override() -> None:
    """``stage2.key=value`` changes stage 2 only."""
    assert load_stage(CONFIGS / "demo", 2, ["stage2.optim.lr=0.5"]).optim.lr == 0.5
    assert load_stage(CONFIGS / "demo", 1, ["stage2.optim.lr=0.5"]).optim.lr == 1e-3


def test_cli_config_error_is_one_line(capsys) -> None:
    assert main(["run", str(CONFIGS / "demo"), "--stages", "1", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "optim.lrr" in err[0]
    assert main(["run", str(CONFIGS / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_command_line_overrides_win_over_phases() -> None:
    """An override applies to every phase; 'stage' and 'phases' cannot be overridden."""
    from pixart_lightning.config import phase_configs

    cfg = load_stage(CONFIGS / "pixart-xl2", 3, ["data.batch_size=8", "stage3.train.max_steps=10"])
    assert {(p.data.batch_size, p.train.max_steps) for _, p in phase_configs(cfg)} == {(8, 10)}
    for bad in ("stage=3", "stage1.phases=[]"):
        with pytest.raises(ConfigError, match="come from the config folder"):
            load_stage(CONFIGS / "demo", 1, [bad])


def test_cross_field_checks() -> None:
    with pytest.raises(ConfigError, match="min_ratio=3.0 is above"):
        load_stage(CONFIGS / "demo", 3, ["data.min_ratio=3"])
    with pytest.raises(ConfigError, match=r"samples.labels \[99\]"):
        load_stage(CONFIGS / "demo", 1, ["samples.labels=[99]"])


def test_a_saved_config_loads_back_as_it_was(tmp_path: Path) -> None:
    """``load_saved`` of a unit's config.yaml (``to_yaml``) is the config that wrote it."""
    for stage in (1, 2, 3):
        cfg = load_stage(CONFIGS / "demo", stage, ["train.max_steps=7"])
        (tmp_path / "config.yaml").write_text(to_yaml(cfg))
        assert load_saved(tmp_path / "config.yaml") == cfg


def test_a_saved_config_with_an_unknown_key_names_the_file(tmp_path: Path) -> None:
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(load_stage(CONFIGS / "demo", 1)).replace("  lr:", "  lrr:"))
    line = next(i for i, text in enumerate(saved.read_text().splitlines(), 1) if "lrr:" in text)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(saved))}:{line}: unknown key 'optim.lrr'"):
        load_saved(saved)
    saved.write_text(to_yaml(load_stage(CONFIGS / "demo", 1)).replace("stage: 1", "stage: 5"))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(saved))}:\d+: stage=5: valid choices are 1, 2, 3, 4"):
        load_saved(saved)


def test_the_saved_config_shows_the_learning_rate_it_trains_with(tmp_path: Path) -> None:
    """With optim.scale_lr the rate is optim.lr x sqrt(global batch / 256); config.yaml says so and still loads."""
    cfg = load_stage(CONFIGS / "pixart-xl2", 2, ["optim.scale_lr=true"])
    plan = cfg.batch_plan()
    assert plan.global_batch == 11392 and cfg.learning_rate() == pytest.approx(2e-5 * (11392 / 256) ** 0.5)
    assert load_stage(CONFIGS / "pixart-xl2", 2).learning_rate() == 2e-5
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    text = (tmp_path / "config.yaml").read_text()
    assert (f"# derived: learning rate = optim.lr 2e-05 x sqrt(global batch 11392 / 256) = {cfg.learning_rate()} "
            "(optim.scale_lr)") in text.splitlines()
    assert f"# derived: global batch 11392 = micro-batch {plan.micro} x {plan.accumulation} accumulation" in text
    assert load_saved(tmp_path / "config.yaml") == cfg


def test_every_fixed_choice_is_a_literal_whose_values_the_errors_name() -> None:
    """The Literal owns the choices: a bad value of each is refused at load, naming them."""
    fields = {key: choices for key, _, choices in literal_fields(StageConfig())}
    assert {"stage", "model.size", "model.attention_backend", "diffusion.prediction", "text_encoder.dtype",
            "train.precision", "train.strategy", "train.sharding", "samples.sampler", "fid.extractor",
            "fid.sampler", "optim.lr_schedule"} == set(fields)
    assert (fields["train.precision"], fields["samples.sampler"]) == (PRECISIONS, SAMPLERS)
    for key, choices in fields.items():
        if key != "stage":  # set by the config folder's file names
            with pytest.raises(ConfigError, match=re.escape(f"{key}='bogus': valid choices are {', '.join(choices)}")):
                load_stage(CONFIGS / "demo", 2, [f"{key}=bogus"])


def test_a_consistency_sampler_takes_no_guidance_and_stage_4_samples_with_it() -> None:
    """lcm samples a model with the guidance inside it; stage 4's grids and FID use it at a distilled step count."""
    with pytest.raises(ConfigError, match=r"samples.sampler=lcm samples a model with the guidance inside it: "
                       r"set samples.cfg_scales=\[1.0\]"):
        load_stage(CONFIGS / "demo", 3, ["samples.sampler=lcm"])  # the demo's grid rows are guidance 1.0 and 4.5
    with pytest.raises(ConfigError, match=r"fid.sampler=dpm\+\+, fid.steps=20: stage 4's student samples with lcm"):
        load_stage(CONFIGS / "demo", 4, ["fid.sampler=dpm++", "fid.steps=20", "fid.cfg_scale=4.5"])
    with pytest.raises(ConfigError, match=r"samples.sampler=lcm, samples.steps=3: .* distill.steps \[1, 2, 4, 8\]"):
        load_stage(CONFIGS / "demo", 4, ["samples.steps=3"])
    assert load_stage(CONFIGS / "demo", 4).fid.sampler == "lcm"


def test_a_config_folder_names_its_runs_and_may_link_another_folders_files() -> None:
    """demo-long links the demo's base and stage 1: its runs go to runs/demo-long (the folder's name) with the demo's
    stage 1 as it is, and only stage 2 differs."""
    long, demo = plan(CONFIGS / "demo-long"), plan(CONFIGS / "demo")
    assert [u.stage for u in long] == [1, 2] and {u.cfg.name for u in long} == {"demo-long"}
    assert long[0].cfg.out_dir == "runs/demo-long" and demo[0].cfg.out_dir == "runs/demo"
    assert to_yaml(long[0].cfg).replace("demo-long", "demo") == to_yaml(demo[0].cfg)  # paths under runs/demo-long
    assert (long[1].cfg.train.max_steps, long[1].cfg.optim.lr_schedule) == (5400, "cosine")
    assert load_stage(CONFIGS / "finetune-demo", 3).name == "finetune-demo"  # a file's name wins
