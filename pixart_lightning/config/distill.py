"""The ``distill`` section: stage 4's latent consistency distillation settings."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(kw_only=True)
class DistillSection:
    """Stage 4: latent consistency distillation of the stage-3 EMA model (the frozen teacher) into a few-step
    student, initialised from the teacher (``stages/stage4.py``)."""

    cfg_scale: float = 4.5
    """The fixed classifier-free guidance scale folded into the teacher's ODE step, at least 1: the student samples
    without guidance and reproduces the teacher at this scale (one scale per student, as PixArt-LCM). Our samplers'
    convention, uncond + s·(cond − uncond); LCM's papers write cond + w·(cond − uncond), so their w is s − 1
    (PixArt-LCM's w = 4.5 is s = 5.5)."""
    steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """The step counts the student is evaluated and served at, each in [1, 50] (the skipping schedule's length);
    ``sample --steps`` refuses others. Training is the same for any of them (one consistency function)."""
    target_ema: float = 0.95
    """Rate of the EMA target network that gives the consistency target, in [0, 1); constant (no warm-up), and
    ``optim.ema_rate`` is not used. The target is saved as ``final-ema.safetensors``; 0: the target is the student
    itself (no gradient) and no EMA is kept."""
    huber_c: float = 0.001
    """Pseudo-Huber constant c, at least 0: the loss is the mean over latent elements of sqrt(d² + c²) − c
    (PixArt-LCM's, unscaled by the latent size); 0: the mean squared error."""
