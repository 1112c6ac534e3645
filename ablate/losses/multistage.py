"""The quick-start's multi-stage schedule: MSE warm-up, InfoNCE, then fine-tuning with the combination."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from ablate.errors import AblateError
from ablate.losses.combined import CombinedLoss
from ablate.losses.infonce import InfoNCELoss
from ablate.losses.mse import MSELoss


class MultiStageScheduler(nn.Module):
    """The quick-start's three stages: MSE warm-up, InfoNCE, then fine-tuning with the combination.

    Epochs are 0-based: ``epoch < stage1_epochs`` is stage 1, ``epoch < stage3_start`` is
    stage 2, the rest is stage 3; ``stage3_start`` defaults to ``stage1_epochs + stage2_epochs``.
    ``get_loss(epoch)`` returns ``(criterion, stage_name)``; ``get_recommended_lr()`` the learning
    rate of the stage of the last ``get_loss`` call.
    """

    label = "multi-stage"
    contrastive = True
    reads: ClassVar[dict[str, str]] = {"stage_lrs": "lrs", "learnable_temperature": "learnable"}
    epoch_fields = ("stage1_epochs", "stage2_epochs", "stage3_start")
    """Run fields counted in epochs: ``--epochs`` scales them with the run."""
    replaces = ("lr",)
    """Run fields the schedule does not read because it has its own (``stage_lrs``)."""
    STAGES = ("mse_warmup", "contrastive", "finetune")

    def __init__(
        self,
        stage1_epochs: int = 50,
        stage2_epochs: int = 100,
        stage3_start: int | None = None,
        *,
        lrs: tuple[float, float, float] = (1e-3, 5e-4, 1e-4),
        temperature: float = 0.07,
        alpha: float = 0.5,
        beta: float = 0.3,
        gamma: float = 0.2,
        symmetric: bool = True,
        learnable: bool = False,
    ):
        super().__init__()
        self.stage1_epochs = stage1_epochs
        self.stage3_start = stage1_epochs + stage2_epochs if stage3_start is None else stage3_start
        if stage1_epochs < 0 or self.stage3_start < stage1_epochs:
            raise AblateError(
                f"stage boundaries must satisfy 0 <= stage1_epochs <= stage3_start, "
                f"got {stage1_epochs} and {self.stage3_start}"
            )
        self.lrs = lrs
        infonce = InfoNCELoss(temperature, symmetric=symmetric, learnable=learnable)
        combined = CombinedLoss(alpha, beta, gamma, temperature, symmetric=symmetric)
        combined.infonce = infonce  # one temperature across stages 2 and 3
        self.criteria = nn.ModuleList([MSELoss(), infonce, combined])
        self.stage = 0

    @staticmethod
    def starts(spec: Any) -> tuple[int, int]:
        """The first epochs (0-based) of stages 2 and 3 of a run."""
        stage3 = spec.stage1_epochs + spec.stage2_epochs if spec.stage3_start is None else spec.stage3_start
        return spec.stage1_epochs, stage3

    @classmethod
    def switches(cls, spec: Any) -> list[int]:
        """The epochs where a run switches its loss."""
        return sorted(set(cls.starts(spec)))

    @classmethod
    def last_stage_start(cls, spec: Any) -> int:
        """The first epoch of the run's last stage (where early stopping starts counting)."""
        stage2, stage3 = cls.starts(spec)
        return stage3 if stage3 < spec.epochs else stage2

    def stage_of(self, epoch: int) -> int:
        """The 0-based stage index of an epoch."""
        if epoch < self.stage1_epochs:
            return 0
        return 1 if epoch < self.stage3_start else 2

    def get_loss(self, epoch: int) -> tuple[nn.Module, str]:
        """The criterion for an epoch and its stage's name."""
        self.stage = self.stage_of(epoch)
        return self.criteria[self.stage], self.STAGES[self.stage]

    def get_recommended_lr(self) -> float:
        """The learning rate of the current stage."""
        return self.lrs[self.stage]
