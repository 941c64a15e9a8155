"""Stage 4, latent consistency distillation: the consistency arithmetic against diffusers' LCMScheduler and a hand
computation, learning on a tiny model, the LoRA teacher, and the runner's 3 -> 4 handoff, resume and refusals."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from pixart_lightning.config import ConfigError, load_stage
from pixart_lightning.config.schema import LoRASection
from pixart_lightning.diffusion.consistency import LatentConsistency, lcm_scheduler, pseudo_huber, skipping_timesteps
from pixart_lightning.diffusion.schedule import linear_betas
from pixart_lightning.files import sha256
from pixart_lightning.interop import load_weights
from pixart_lightning.runner.chain import run
from pixart_lightning.runner.unit import RunnerError
from pixart_lightning.training import lora
from pixart_lightning.training.distill import Teacher, distillation_losses, teacher_ode_step
from pixart_lightning.training.ema import EMA
from tests.conftest import tiny_model
from tests.test_stages import Recorder

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PREDICTIONS = ("v", "epsilon")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine its waits cost more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batch(seed: int = 0, size: int = 4) -> tuple[torch.Tensor, dict]:
    """Latents and caption features for the tiny model (4 channels, 8 x 8), every caption kept."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(size, 4, 8, 8, generator=gen)
    y = torch.randn(size, 5, 16, generator=gen)
    return x0, {"y": y, "mask": None, "force_drop_ids": torch.zeros(size, dtype=torch.long)}


# ---------------------------------------------------------------------------------------------- the arithmetic
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_consistency_function_is_the_identity_at_zero_with_diffusers_scalings(prediction: str) -> None:
    lcm, scheduler = LatentConsistency(prediction), lcm_scheduler(prediction)
    scheduler.set_timesteps(50)
    assert torch.equal(skipping_timesteps(), scheduler.timesteps.sort().values)  # the sampler's 50 origin steps
    start, end = lcm.timesteps(torch.tensor([0, 1, 49]))
    assert start.tolist() == [19, 39, 999] and end.tolist() == [0, 19, 979]
    x, output = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    assert torch.equal(lcm.consistency(output, x, torch.zeros(3, dtype=torch.long)), x)
    t = torch.tensor([0, 19, 999])
    c_skip, c_out = lcm.boundary_scalings(t, x)
    for i, step in enumerate(t.tolist()):
        skip, out = scheduler.get_scalings_for_boundary_condition_discrete(step)
        assert c_skip[i].item() == pytest.approx(skip, rel=1e-6) and c_out[i].item() == pytest.approx(out, rel=1e-6)
    # At 999 the map is (almost) the prediction's x_0, as LCMScheduler.step denoises it.
    scheduler.set_timesteps(1)
    denoised = scheduler.step(output[:1], 999, x[:1]).denoised
    torch.testing.assert_close(lcm.consistency(output[:1], x[:1], torch.tensor([999])), denoised)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_guided_teacher_step_is_ddim_by_hand(prediction: str) -> None:
    model, (x_t, kwargs), scale = tiny_model(), batch(), 4.5
    t, t_prev = torch.tensor([999, 519, 39, 19]), torch.tensor([979, 499, 19, 0])
    stepped = teacher_ode_step(Teacher(model, shares_base=False), LatentConsistency(prediction), x_t, t, t_prev,
                               kwargs, scale)
    with torch.no_grad():
        cond = model(x_t, t, kwargs["y"], force_drop_ids=torch.zeros(4, dtype=torch.long))[:, :4].double()
        uncond = model(x_t, t, kwargs["y"], force_drop_ids=torch.ones(4, dtype=torch.long))[:, :4].double()
    guided, x = uncond + scale * (cond - uncond), x_t.double()
    alphas = torch.from_numpy(np.cumprod(1 - linear_betas()))
    a, a_prev = alphas[t].view(-1, 1, 1, 1), alphas[t_prev].view(-1, 1, 1, 1)
    if prediction == "v":
        x0, eps = a.sqrt() * x - (1 - a).sqrt() * guided, a.sqrt() * guided + (1 - a).sqrt() * x
    else:
        x0, eps = (x - (1 - a).sqrt() * guided) / a.sqrt(), guided
    torch.testing.assert_close(stepped.double(), a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps, rtol=1e-4, atol=1e-4)


def test_pseudo_huber_and_its_l2_limit() -> None:
    a, b = torch.tensor([[0.0, 3.0]]), torch.tensor([[0.0, -1.0]])
    assert pseudo_huber(a, b, 0.0).tolist() == [8.0]  # mean of 0 and 16
    assert pseudo_huber(a, b, 3.0).tolist() == pytest.approx([(5.0 - 3.0) / 2])


# ---------------------------------------------------------------------------------------------- learning
def train(student, teacher: Teacher, steps: int, lr: float = 1e-3, prediction: str = "v") -> list[float]:
    """Distil on one fixed batch (fixed skipping-schedule points and noise) with an EMA target; the losses."""
    lcm, target = LatentConsistency(prediction), EMA(student, 0.95)
    x0, kwargs = batch(1, 8)
    gen = torch.Generator().manual_seed(2)
    index, noise = torch.randint(0, 50, (8,), generator=gen), torch.randn(x0.shape, generator=gen)
    optimizer = torch.optim.Adam(lora.trainable(student), lr)
    losses = []
    for _ in range(steps):
        loss = distillation_losses(student, teacher, target.model, lcm, x0, index, noise, dict(kwargs), 4.5,
                                   0.001)["loss"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        target.update(student)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_the_student_learns_the_guided_teacher(prediction: str) -> None:
    student = tiny_model().train()
    losses = train(student, Teacher(student, shares_base=False), 10, prediction=prediction)
    assert losses[-1] < 0.6 * losses[0]


def test_lora_teacher_is_the_frozen_base_and_only_adapters_train() -> None:
    student = tiny_model()
    original = copy.deepcopy(student)
    lora.add_adapters(student, LoRASection(rank=2))
    student.train()
    base = {k: v.clone() for k, v in student.state_dict().items() if not lora.is_adapter_key(k)}
    teacher = Teacher(student, shares_base=True)
    assert teacher.copy is None  # no second backbone
    x, kwargs = batch(3)
    t = torch.tensor([999, 500, 100, 19])
    losses = train(student, teacher, 4)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        torch.testing.assert_close(teacher(x, t, **kwargs), original(x, t, **kwargs))  # adapters off: the base
        assert not torch.allclose(student(x, t, **kwargs), original(x, t, **kwargs))  # adapters on again, trained
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in base.items())
    assert {n for n, p in student.named_parameters() if p.requires_grad} == {
        n for n, _ in student.named_parameters() if lora.is_adapter_key(n)}


# ---------------------------------------------------------------------------------------------- the runner
STAGE3 = """data:
  shards: ${out_dir}/data/stage3
  synth: {count: 96, seed: 3, samples_per_shard: 48}
  multi_scale: true
  min_ratio: 0.5
  max_ratio: 2.0
  resolution: 24
  batch_size: 4
train:
  max_steps: 2
"""
STAGE4 = STAGE3.replace("max_steps: 2", "max_steps: 4") + ("distill: {cfg_scale: 3.0, steps: [1, 2]}\nsamples: {sampler: lcm}\n"
                                                             "fid: {sampler: lcm, steps: 2, cfg_scale: 1.0}\n")
OVERRIDES = ["model.depth=1", "model.hidden_size=48", "model.num_heads=4",
             "data.num_workers=0", "data.shuffle_buffer=8", "optim.warmup_steps=2", "train.checkpoint_every=2",
             "train.progress_bar=false", "train.log_every=1", "train.threads=1", "samples.steps=1", "samples.cfg_scales=[1.0]",
             "samples.prompts=[a red circle]", "eval.alignment_prompts=0"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    """A config folder of the demo's base with tiny stages 3 and 4, and a run of it whose stage 3 is done."""
    folder = tmp_path_factory.mktemp("config")
    shutil.copy(CONFIGS / "demo" / "base.yaml", folder / "base.yaml")
    (folder / "stage3.yaml").write_text(STAGE3)
    (folder / "stage4.yaml").write_text(STAGE4)
    run(folder, [3], [f"out_dir={folder / 'run'}", *OVERRIDES])
    return folder


def stage4(chain: Path, out: Path, *extra: str, callbacks: list | None = None) -> Path:
    """Stage 4 in ``out``, a copy of the chain's run (stage 3 done)."""
    if not out.exists():
        shutil.copytree(chain / "run", out, ignore=shutil.ignore_patterns("stage4"))
    run(chain, [4], [f"out_dir={out}", *OVERRIDES, *extra], callbacks=callbacks)
    return out / "stage4"


class Start(L.Callback):
    """The student, teacher and target as training starts, and the parameters the optimizer holds."""

    def on_train_start(self, trainer, pl_module):
        self.student = copy.deepcopy(pl_module.model.state_dict())
        self.teacher = pl_module.teacher
        self.target = copy.deepcopy(pl_module.target.state_dict())
        held = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        self.trained = {n for n, p in pl_module.model.named_parameters() if id(p) in held}


def test_stage4_starts_from_stage3_ema_and_resumes_exactly(chain: Path, tmp_path: Path) -> None:
    """Handoff: the student, teacher and target start as stage 3's EMA weights, recorded as the parent; an
    interrupted run continues with the losses and weights of an unbroken one."""
    start, whole = Start(), Recorder()
    folder = stage4(chain, tmp_path / "whole", callbacks=[start, whole])
    teacher_file = tmp_path / "whole" / "stage3" / "final-ema.safetensors"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "done"
    assert manifest["parent"] == {"path": str(teacher_file), "sha256": sha256(teacher_file)}
    ema = load_weights(teacher_file).state_dict()
    for weights in (start.student, start.target, start.teacher.copy.state_dict()):
        assert weights.keys() == ema.keys() and all(torch.equal(weights[k], ema[k]) for k in ema)
    assert start.trained == {n for n, _ in load_weights(teacher_file).named_parameters()}
    saved = (folder / "config.yaml").read_text()
    assert "stage: 4" in saved and "cfg_scale: 3.0" in saved
    assert (folder / "final.safetensors").is_file() and (folder / "final-ema.safetensors").is_file()

    broken = Recorder(fail_at=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        stage4(chain, tmp_path / "broken", callbacks=[broken])
    resumed = Recorder()
    stage4(chain, tmp_path / "broken", callbacks=[resumed])
    assert sorted(resumed.steps) == [3, 4]
    for step in (3, 4):
        assert resumed.steps[step] == (whole.steps[step][0], pytest.approx(whole.steps[step][1], rel=1e-5, abs=1e-7))
    for name in ("final.safetensors", "final-ema.safetensors"):
        a, b = (load_weights(f / name).state_dict() for f in (folder, tmp_path / "broken" / "stage4"))
        assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


def test_lora_stage4_trains_only_adapters_and_saves_them(chain: Path, tmp_path: Path) -> None:
    start = Start()
    folder = stage4(chain, tmp_path / "lora", "stage4.model.lora={rank: 2}", "stage4.train.max_steps=2",
                    callbacks=[start])
    assert start.teacher.copy is None
    assert start.trained and all(lora.is_adapter_key(n) for n in start.trained)
    assert (folder / "final-lora.safetensors").is_file() and (folder / "final-ema-lora.safetensors").is_file()


def test_bad_teachers_are_refused_with_what_to_do(chain: Path, tmp_path: Path) -> None:
    with pytest.raises(RunnerError, match=r"predicts v .*set stage4.diffusion.prediction=v"):
        stage4(chain, tmp_path / "eps", "stage4.diffusion.prediction=epsilon")
    shutil.copytree(chain / "run", tmp_path / "no-ema", ignore=shutil.ignore_patterns("stage4"))
    (tmp_path / "no-ema" / "stage3" / "final-ema.safetensors").unlink()
    with pytest.raises(RunnerError, match=r"EMA weights .* optim.ema_rate > 0"):
        stage4(chain, tmp_path / "no-ema")
    assert not (tmp_path / "no-ema" / "stage4" / "final.safetensors").exists()


@pytest.mark.parametrize("bad, says", [
    ("distill.cfg_scale=0.5", "distill.cfg_scale=0.5: must be at least 1"),
    ("distill.steps=[0,4,60]", "distill.steps=[0, 4, 60]: give step counts in [1, 50]"),
    ("distill.target_ema=1.0", "distill.target_ema=1.0: must be in [0, 1)"),
    ("distill.huber_c=-1", "distill.huber_c=-1.0: must be at least 0"),
])
def test_distill_settings_are_checked(chain: Path, bad: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_stage(chain, 4, [bad])
    load_stage(chain, 3, [bad])  # other stages ignore the section


def test_shipped_stage4_configs_load() -> None:
    xl = load_stage(CONFIGS / "pixart-xl2", 4)
    assert xl.stage == 4 and xl.diffusion.prediction == "epsilon" and xl.distill.target_ema == 0.95
