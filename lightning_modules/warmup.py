"""The distillation's per-point warm-up: the student fits the teacher's per-point outputs before rendering.

Run by :meth:`lightning_modules.distill.DistillModule.on_fit_start` (``warmup_steps`` > 0, our
choice; DESIGN.md, "Distillation losses"). Its own Adam with a cosine schedule minimises the stage's
``warmup_losses`` (:func:`models.losses.per_point_distillation_losses`) on random unit normals; L_gt
and the other render terms then start from a student that already is the teacher's cloud. What it
gained on the CPU demo is in docs/history.md.

Interrupting it is safe: until it ends, the stage's checkpoint holds the weights it started from
(``_pre_warmup``) and ``warmup_done`` False, so a resumed fit runs the whole warm-up again, exactly as
this one would. Under DDP every rank warms up alike and takes rank 0's weights at the end.
"""

from __future__ import annotations

import time

import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_modules.stage import check_finite_losses
from models.losses import per_point_distillation_losses

__all__ = ["PerPointWarmup", "run_warmup"]


def run_warmup(module, steps: int, lr: float, seed: int, num_normals: int = 4096) -> None:
    """Warm ``module``'s student (and feature adapter) up for ``steps`` Adam steps (learning rate ``lr``,
    cosine to 0), then recalibrate its batch-norm statistics and set ``module.warmup_done``.

    Args:
        module: a :class:`~lightning_modules.distill.DistillModule` inside ``Trainer.fit`` (its
            ``student``, ``adapter``, ``warmup_losses``, ``warmup_done`` and ``_pre_warmup`` are used).
        steps, lr: the warm-up's length and learning rate.
        seed: seeds the random normals (the same on every rank).
        num_normals: normals per step where the shading networks are compared.

    Raises:
        FloatingPointError: a non-finite term (:func:`~lightning_modules.stage.check_finite_losses`).
    """
    trainer = module.trainer
    if trainer.ckpt_path is not None and getattr(trainer.strategy, "restore_checkpoint_after_setup", False):
        return  # a strategy that restores the weights after on_fit_start: warmup_done is not known yet
    from tqdm.auto import tqdm

    modules = (("student", module.student), ("adapter", module.adapter))
    module._pre_warmup = {name: {k: v.detach().clone() for k, v in m.state_dict().items()} for name, m in modules}
    params = [p for p in (*module.student.parameters(), *module.adapter.parameters()) if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + 7)
    module.student.train()
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="distillation warm-up (per-point, no rendering)", leave=False,
               disable=module.global_rank != 0 or trainer.progress_bar_callback is None)
    with torch.enable_grad():
        for step in bar:
            normals = torch.nn.functional.normalize(torch.randn(num_normals, 3, generator=generator), dim=-1)
            terms = module.warmup_losses(normals.to(module.device))
            check_finite_losses({f"warmup_{k}": v for k, v in terms.items()}, step)
            # autograd.grad, not backward: no DDP gradient hook fires outside its forward
            grads = torch.autograd.grad(terms["total"], params, allow_unused=True)
            for p, g in zip(params, grads):
                p.grad = None if g is None else g.detach()
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{terms['total'].item():.4f}", refresh=False)
    for p in params:
        p.grad = None
    if trainer.world_size > 1:  # every rank warmed up alike; rank 0's weights settle any round-off
        state = trainer.strategy.broadcast(  # on the CPU: pickled CUDA tensors would land on GPU 0
            {name: {k: v.cpu() for k, v in m.state_dict().items()} for name, m in modules}, src=0)
        for name, m in modules:
            m.load_state_dict(state[name])
    module.student.recalibrate_batchnorm()
    module.warmup_done.fill_(True)
    module._pre_warmup = None
    rank_zero_info(f"distillation warm-up: {steps} steps in {time.perf_counter() - start:.1f} s; "
                   + ", ".join(f"{k} {v.item():.4g}" for k, v in terms.items() if k != "total"))


class PerPointWarmup:
    """The warm-up's part of the distillation stage (a mixin): its losses and the hook that runs it.

    The stage holds ``student``, ``adapter``, ``teacher``, ``teacher_canonical()``, ``loss_weights``
    and the hyper-parameters ``warmup_steps``, ``warmup_lr``, ``warmup_deformation_weight``, ``seed``.
    """

    #: the student's and adapter's state dicts from before a running warm-up (None when none runs)
    _pre_warmup: dict[str, dict[str, torch.Tensor]] | None = None

    def warmup_losses(self, normals: torch.Tensor) -> dict[str, torch.Tensor]:
        """The warm-up's terms (:func:`models.losses.per_point_distillation_losses`) of the student as it
        is now, on (M, 3) unit ``normals``: L_out's while λ_out > 0, L_feat's while λ_feat > 0."""
        canonical = self.student.canonical()
        adapted = self.adapter(canonical.feature) if self.loss_weights["feat"] > 0 else None
        return per_point_distillation_losses(
            canonical, self.teacher_canonical(), self.student.shading, self.teacher.shading, normals, adapted,
            outputs=self.loss_weights["out"] > 0, deformation_weight=self.hparams.warmup_deformation_weight)

    def on_fit_start(self) -> None:
        """Runs the warm-up (:func:`run_warmup`) unless it is off, done (a resumed fit) or has no term."""
        hp, w = self.hparams, self.loss_weights
        if hp.warmup_steps > 0 and not bool(self.warmup_done) and (w["out"] > 0 or w["feat"] > 0):
            run_warmup(self, hp.warmup_steps, hp.warmup_lr, hp.seed)

    def student_state_to_save(self, checkpoint: dict) -> dict[str, torch.Tensor]:
        """The student's state dict a checkpoint holds: its weights now (batch-norm statistics made exact),
        or, interrupted inside the warm-up, those it started from (the adapter's too, into ``checkpoint``)."""
        if self._pre_warmup is None:
            self.student.recalibrate_batchnorm()  # the state dict was collected before this hook: refresh it
            return self.student.state_dict()
        checkpoint["state_dict"].update({f"adapter.{k}": v for k, v in self._pre_warmup["adapter"].items()})
        return self._pre_warmup["student"]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Checkpoints from before the warm-up existed hold a trained student: never warm it up again."""
        super().on_load_checkpoint(checkpoint)
        checkpoint["state_dict"].setdefault("warmup_done", torch.ones((), dtype=torch.bool))
