"""The paper recipe at real scale: position tables, global batches, torchrun under Slurm, fp16 refused.

Position tables are checked against the DiT / official PixArt-α formula written out here with numpy, not
against the project's own export code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from callbacks.checkpoints import Checkpoints
from pixart_lightning.config import ConfigError, load_stage, phase_configs
from pixart_lightning.interop.formats import to_official
from pixart_lightning.models import PixArt
from pixart_lightning.runner.trainer import make_trainer
from stages import STAGE_MODULES
from tests.conftest import randomize

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEBUG = ["model.size=PixArt-debug/2", "data.shards=unused"]
LATENT = ["vae.name=stabilityai/sd-vae-ft-ema"]  # a name only: nothing is loaded, latents are 1/8 of the pixels


def official_table(dim: int, grid: int, base_size: int, lewei_scale: float) -> np.ndarray:
    """DiT's get_2d_sincos_pos_embed with PixArt-α's two extra arguments: coordinates arange(grid) / (grid /
    base_size) / lewei_scale; the first half of each row encodes the column, the second half the row."""
    coords = np.arange(grid, dtype=np.float64) / (grid / base_size) / lewei_scale
    cols, rows = np.meshgrid(coords, coords)  # column coordinate varies along each row

    def one_axis(pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([one_axis(cols), one_axis(rows)], axis=1)


def table(model: PixArt) -> np.ndarray:
    grid = model.cfg.sample_size // model.cfg.patch_size
    return model.position_embedding(grid, grid, torch.device("cpu"), torch.float32)[0].double().numpy()


@pytest.mark.parametrize(("resolution", "lewei_scale"), [(256, 1), (512, 1), (1024, 2)])
def test_default_position_table_is_the_official_one(resolution: int, lewei_scale: int) -> None:
    """1 at 256 and 512 px, 2 at 1024 px (the official inference table); at 256 px that is DiT's plain grid."""
    cfg = load_stage(CONFIGS / "pixart-xl2", 2, [*DEBUG, f"data.resolution={resolution}"])
    model = PixArt(cfg.pixart_config(caption_channels=8))
    grid = resolution // 8 // 2
    assert model.cfg.interpolation_scale == lewei_scale
    np.testing.assert_allclose(table(model), official_table(48, grid, grid, lewei_scale), atol=1e-6)


def test_stage3_phases_go_one_one_two() -> None:
    """256 -> 512 -> 1024 px: each handoff takes the phase's scale (1, 1, 2), not a ratio of sides."""
    stage2 = load_stage(CONFIGS / "pixart-xl2", 2, DEBUG)
    model = PixArt(stage2.pixart_config(caption_channels=8))
    scales = []
    for _, cfg in phase_configs(load_stage(CONFIGS / "pixart-xl2", 3, DEBUG)):
        model = STAGE_MODULES[3].initial_model(cfg, model, 8)
        grid = cfg.data.resolution // 16
        base = grid
        np.testing.assert_allclose(table(model), official_table(48, grid, base, model.cfg.interpolation_scale), atol=1e-6)
        scales.append(model.cfg.interpolation_scale)
    assert scales == [1.0, 1.0, 2.0]


@pytest.mark.parametrize("explicit", [None, 0.5])
def test_stage1_from_a_dit_checkpoint_computes_that_dit(tmp_path: Path, explicit: float | None) -> None:
    """A released-DiT-style file whose pos_embed is DiT's own 256-px grid: the stage-1 model starts as that DiT
    (its output equals the DiT forward with the file's table), unless the config names another scale."""
    overrides = [*DEBUG, *LATENT, "model.hidden_size=48", "model.num_heads=4", "data.resolution=256",
                 f"model.interpolation_scale={explicit or 'null'}"]
    cfg = load_stage(CONFIGS / "demo", 1, overrides)
    dit = randomize(PixArt(cfg.pixart_config(interpolation_scale=1.0))).eval()
    state = to_official(dit)
    state["pos_embed"] = torch.from_numpy(official_table(48, 16, 16, 1.0)).float()[None]
    torch.save(state, tmp_path / "DiT-debug-2-256x256.pt")

    cfg = load_stage(CONFIGS / "demo", 1, [*overrides, f"model.init_from={tmp_path}/DiT-debug-2-256x256.pt"])
    started = STAGE_MODULES[1].initial_model(cfg, None, None).eval()
    dit.position_embedding = lambda h, w, device, dtype: state["pos_embed"].to(device, dtype)  # the file's table
    x, t, y = torch.randn(2, 4, 32, 32), torch.tensor([10, 700]), torch.tensor([1, 7])
    with torch.no_grad():
        difference = (started(x, t, y) - dit(x, t, y)).abs().max().item()
    if explicit is None:
        assert started.cfg.interpolation_scale == 1.0 and difference < 1e-5
    else:
        assert started.cfg.interpolation_scale == explicit and difference > 1e-3


def test_demo_keeps_its_named_position_scale() -> None:
    """The demo's tiny grids keep resolution/512 (a stated deviation), stage 3 at its own resolution."""
    scales = [load_stage(CONFIGS / "demo", s).pixart_config(caption_channels=8).interpolation_scale for s in (1, 2, 3)]
    assert scales == [24 / 512, 24 / 512, 32 / 512]


@pytest.mark.parametrize(("devices", "nodes", "micro", "accumulation"), [(8, 1, 178, 8), (8, 8, 178, 1), (1, 1, 178, 64)])
def test_the_paper_global_batch_on_any_world_size(devices: int, nodes: int, micro: int, accumulation: int) -> None:
    """Stage 2's 11,392 images per step on 8, 64 or 1 GPU(s): micro-batches of at most 178, plus accumulation."""
    cfg = load_stage(CONFIGS / "pixart-xl2", 2, [f"train.devices={devices}", f"train.num_nodes={nodes}"])
    plan = cfg.batch_plan()
    assert (plan.micro, plan.accumulation, plan.global_batch) == (micro, accumulation, 11392)


def test_paper_global_batches_per_stage() -> None:
    xl = CONFIGS / "pixart-xl2"
    batches = [load_stage(xl, 1).batch_plan().global_batch, load_stage(xl, 2).batch_plan().global_batch]
    batches += [cfg.batch_plan().global_batch for _, cfg in phase_configs(load_stage(xl, 3))]
    assert batches == [1024, 11392, 11392, 2560, 384]


def test_a_global_batch_the_world_does_not_divide_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"data.global_batch_size=11392 is not divisible by the 24 processes "
                                          r"\(train.devices=8 x train.num_nodes=3\); use a multiple of 24, e.g. 11376 or 11400"):
        load_stage(CONFIGS / "pixart-xl2", 2, ["train.num_nodes=3"])


def test_fp16_is_refused_with_the_alternatives() -> None:
    with pytest.raises(ConfigError, match=r"16-mixed' is not supported.*use bf16-mixed .* or 32 \(V100\)"):
        load_stage(CONFIGS / "demo", 1, ["train.precision=16-mixed"])


SLURM = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
         "SLURM_NODEID": "0", "SLURM_JOB_ID": "42", "SLURM_NODELIST": "node1"}
TORCHRUN = {"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "GROUP_RANK": "0",
            "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555"}


@pytest.mark.parametrize(("variables", "expected"), [(SLURM, "SLURMEnvironment"),
                                                     ({**SLURM, **TORCHRUN}, "TorchElasticEnvironment")])
def test_torchrun_inside_slurm_takes_its_ranks_from_torchrun(tmp_path: Path, monkeypatch, variables, expected) -> None:
    """Under torchrun every child sees the same SLURM_PROCID: the ranks must come from torchrun's variables."""
    for key, value in variables.items():
        monkeypatch.setenv(key, value)
    cfg = load_stage(CONFIGS / "demo", 1, ["train.progress_bar=false"])
    trainer = make_trainer(cfg, tmp_path, Checkpoints(tmp_path / "checkpoints", 10, 1), evaluation=False)
    assert type(trainer._accelerator_connector.cluster_environment).__name__ == expected


def test_checkpoints_sit_on_step_boundaries_under_accumulation(tmp_path: Path) -> None:
    """With 2 micro-batches per step, each step is saved once, after its second micro-batch (not after the first
    micro-batch of the next step, which still sees the same global_step)."""
    import lightning as L
    from torch.utils.data import DataLoader

    from tests.multiproc_train import GlobalBatches, small_stage2

    saved: list[tuple[int, int]] = []

    class Spy(Checkpoints):
        def save(self, trainer):
            saved.append((trainer.global_step, trainer.fit_loop.epoch_loop.batch_idx))
            return super().save(trainer)

    module = small_stage2(3, "data.batch_size=4", "data.global_batch_size=8")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, accumulate_grad_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Spy(tmp_path / "checkpoints", 1, 5)], default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=DataLoader(GlobalBatches(0, 3, 0, 1, 2), batch_size=None))
    assert [step for step, _ in saved] == [1, 2, 3] and all(batch % 2 == 1 for _, batch in saved)


def test_a_batch_size_that_forces_tiny_micro_batches_is_refused() -> None:
    """1,424 images per GPU (stage 2 on 8 GPUs) = 16 x 89: data.batch_size=64 would run micro-batches of 16."""
    with pytest.raises(ConfigError, match=r"data.batch_size=64: the per-device share of data.global_batch_size=11392 "
                                          r"over 8 processes is 1424, whose largest divisor up to 64 is 16 \(89 "
                                          r"accumulation steps of 16\); use a divisor of 1424 such as 16 \(89 steps\) "
                                          r"or 89 \(16 steps\)"):
        load_stage(CONFIGS / "pixart-xl2", 2, ["data.batch_size=64"])
    assert load_stage(CONFIGS / "pixart-xl2", 2, ["data.batch_size=89"]).batch_plan().accumulation == 16


def test_ranks_agree_on_preemption_at_least_every_step_under_accumulation() -> None:
    """About 10 micro-batches between agreements: a paper-scale step of 8 micro-batches takes seconds."""
    from callbacks.preemption import agreement_interval

    assert [agreement_interval(a) for a in (1, 2, 8, 64)] == [10, 5, 1, 1]


@pytest.mark.parametrize(("scale_lr", "lr"), [(False, 2e-5), (True, 2e-5 * (11392 / 256) ** 0.5)])
def test_paper_learning_rate_with_the_official_scaling_as_one_override(scale_lr: bool, lr: float) -> None:
    """configs/pixart-xl2 follows the paper's plain 2e-5; optim.scale_lr=true gives the official configs'
    sqrt(global batch / 256), taken over the global batch (x6.7 at stage 2), not the per-device micro-batch."""
    from pixart_lightning.encoders.vae import PixelSpace

    cfg = load_stage(CONFIGS / "pixart-xl2", 2, [*DEBUG, f"optim.scale_lr={scale_lr}"])
    module = STAGE_MODULES[2](cfg, PixArt(cfg.pixart_config(caption_channels=8)), PixelSpace(), None)
    optimizer = module.configure_optimizers()["optimizer"]
    assert optimizer.param_groups[0]["initial_lr"] == pytest.approx(lr)  # before the warm-up factor
