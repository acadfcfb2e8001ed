"""Everything a training run depends on, in one dataclass that travels inside its checkpoint.

Defaults are the paper's ResNet-50 recipe (docs/multigrain.md, section 2): SGD momentum 0.9, weight
decay 1e-4, lr 0.2 x B / 512, 120 epochs with lr x 0.1 at 30/60/90, |B| = 512, m = 3 repeats,
lam = 0.5, p = 3. Fine-tuning on unlabelled images (`images` set) uses gentler defaults for the
fields left at None: a pretrained network needs a small learning rate and few epochs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from mgdedup.errors import MgdedupError

#: paper: lr 0.2 at |B| = 512, scaled linearly with the global batch size
PAPER_LR_PER_512 = 0.2
#: fine-tuning from --init (BatchNorm frozen): not scaled with the batch, because the limit is
#: the curvature of the pretrained network, not gradient noise. On EfficientNet-Lite0 larger
#: rates diverged or let the distillation term drift (BENCHMARKS.md, fine-tuning rounds).
FINETUNE_LR = 1e-4
PAPER_EPOCHS = 120
PAPER_MILESTONES = (30, 60, 90)
#: unlabelled fine-tuning: an epoch is ceil(2 N / B) iterations, as for ImageNet. The held-out
#: gain peaks after about two epochs and is lost again with more, while top-1 agreement keeps
#: falling (BENCHMARKS.md); the held-out selection (copy_validation) guards against stopping
#: late, not against wasted time.
FINETUNE_EPOCHS = 2
FINETUNE_MILESTONES: tuple[int, ...] = ()
AUGMENTS = ("full", "autoaugment")

#: fields that may differ when a run is resumed (they do not change the optimisation)
RUNTIME_FIELDS = frozenset({
    "workers", "device", "out", "run_dir", "resume", "stop_after", "save_every", "log_every",
    "epochs", "whiten", "validate_every",
})


@dataclass
class TrainConfig:
    """All flags of `mgdedup train`; None means "the default for this kind of run"."""

    # data: exactly one of imagenet (labelled ImageFolder layout) or images (unlabelled)
    imagenet: str | None = None
    images: str | None = None
    init: str | None = None  # None: ResNet-50 from scratch; "default" or a model file
    out: str | None = None  # final model file (default: RUN_DIR/model.pt)
    run_dir: str | None = None  # last.ckpt + metrics.jsonl (default: next to --out)
    resume: str | None = None
    # objective
    lam: float = 0.5
    p: float = 3.0
    learn_p: bool = False
    repeats: int = 3
    beta0: float | None = None  # initial margin beta; None: 1.2 (paper), estimated with --images
    temperature: float = 1.0  # distillation temperature (unlabelled fine-tuning)
    freeze_bn: bool | None = None  # None: frozen BatchNorm statistics when starting from --init
    train_blocks: int | None = None  # None: every layer learns; K: only the trunk's last K blocks
    whiten: bool = True  # --images: refit the initial model's whitenings on the images at the end
    # --images: hold a tenth of the images out of training, score copy retrieval on them at
    # the start and at every validation, and keep the best model (mgdedup.training.copy_validation)
    select_best: bool = True
    # the first of the m copies of each image in a batch is the image unaugmented (its test
    # view); None: on with --images (copy detection), off for --imagenet (the paper's RA)
    original_view: bool | None = None
    validate_every: int = 0  # also validate every N iterations (0: at epoch ends only)
    # schedule
    epochs: int | None = None
    batch_size: int = 512  # global, over all processes
    lr: float | None = None  # None: 0.2 x B / 512 (1e-4 when starting from --init)
    beta_lr_factor: float = 0.1  # lr of the margin beta = factor x lr (paper 0.1)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    milestones: list[int] | None = None  # epochs where lr x gamma
    gamma: float = 0.1
    iters_per_epoch: int | None = None  # None: ceil(2 N / B) as the paper's 5005
    # data pipeline
    augment: str = "full"
    resolution: int = 224
    workers: int = 4
    # machine
    device: str | None = None  # None: cuda if available, else cpu
    amp: bool | None = None  # None: on for CUDA, off for CPU
    seed: int = 0
    # bookkeeping
    save_every: int = 0  # also checkpoint every N iterations (0: only at epoch ends)
    stop_after: int | None = None  # stop (with a checkpoint) after this global iteration
    log_every: int = 20

    # --- derived values -------------------------------------------------------------------
    @property
    def finetuning(self) -> bool:
        return self.images is not None

    @property
    def frozen_bn(self) -> bool:
        """Fine-tuning with small batches: batch statistics of a few images (m copies each)
        would both change the outputs (the teacher uses running statistics) and overwrite the
        pretrained running statistics, so BatchNorm stays in eval mode (affine still learned)."""
        if self.freeze_bn is not None:
            return bool(self.freeze_bn)
        return self.init is not None

    @property
    def original_views(self) -> bool:
        """Fine-tuning pulls copies towards the view `index` stores, which retrieved held-out
        copies better than all-augmented groups (BENCHMARKS.md, third round of fine-tuning)."""
        if self.original_view is not None:
            return bool(self.original_view)
        return self.finetuning

    @property
    def base_lr(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        if self.init is not None:
            return FINETUNE_LR
        return PAPER_LR_PER_512 * self.batch_size / 512

    @property
    def num_epochs(self) -> int:
        if self.epochs is not None:
            return int(self.epochs)
        return FINETUNE_EPOCHS if self.finetuning else PAPER_EPOCHS

    @property
    def lr_milestones(self) -> list[int]:
        if self.milestones is not None:
            return sorted(int(m) for m in self.milestones)
        return list(FINETUNE_MILESTONES if self.finetuning else PAPER_MILESTONES)

    def validate(self) -> None:
        """One-line MgdedupError for any inconsistent flag, before anything heavy starts."""
        if (self.imagenet is None) == (self.images is None):
            raise MgdedupError("give exactly one of --imagenet ROOT (labelled) or --images DIR "
                               "(unlabelled fine-tuning)")
        if self.images is not None and self.init is None:
            raise MgdedupError("--images fine-tunes a trained model: add --init default or "
                               "--init MODEL_FILE")
        if not 0.0 <= self.lam <= 1.0:
            raise MgdedupError(f"--lam must be between 0 and 1, got {self.lam:g}")
        if self.p < 1.0:
            raise MgdedupError(f"--p must be at least 1, got {self.p:g}")
        if self.repeats < 1:
            raise MgdedupError(f"--repeats must be at least 1, got {self.repeats}")
        if self.batch_size < 2:
            raise MgdedupError(f"--batch-size must be at least 2, got {self.batch_size}")
        if self.lam < 1.0 and self.repeats < 2:
            raise MgdedupError("the margin loss needs positives: use --repeats 2 or more "
                               "(or --lam 1 for classification only)")
        if self.epochs is not None and self.epochs < 1:
            raise MgdedupError(f"--epochs must be at least 1, got {self.epochs}")
        if self.lr is not None and self.lr <= 0:
            raise MgdedupError(f"--lr must be positive, got {self.lr:g}")
        if self.iters_per_epoch is not None and self.iters_per_epoch < 1:
            raise MgdedupError(f"--iters-per-epoch must be at least 1, got {self.iters_per_epoch}")
        if self.augment not in AUGMENTS:
            raise MgdedupError(f"--augment must be one of {', '.join(AUGMENTS)}, "
                               f"got '{self.augment}'")
        if self.resolution < 32:
            raise MgdedupError(f"--resolution must be at least 32, got {self.resolution}")
        if self.workers < 0:
            raise MgdedupError(f"--workers must be >= 0, got {self.workers}")
        if self.temperature <= 0:
            raise MgdedupError(f"--temperature must be positive, got {self.temperature:g}")
        if self.validate_every < 0:
            raise MgdedupError(f"--validate-every must be >= 0, got {self.validate_every}")
        if self.milestones is not None and any(m < 1 for m in self.milestones):
            raise MgdedupError("--milestones must be positive epoch numbers")

    # --- paths ----------------------------------------------------------------------------
    def run_path(self) -> Path:
        """Folder of last.ckpt and metrics.jsonl: --run-dir, else next to --out."""
        if self.run_dir is not None:
            return Path(self.run_dir).expanduser()
        if self.out is not None:
            out = Path(self.out).expanduser()
            return out.with_name(out.stem + ".run")
        return Path("mgdedup-run")

    def out_path(self) -> Path:
        return Path(self.out).expanduser() if self.out is not None else self.run_path() / "model.pt"

    # --- (de)serialisation: plain values only, for torch.load(weights_only=True) ---------
    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        if data["milestones"] is not None:
            data["milestones"] = [int(m) for m in data["milestones"]]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self, **changes: object) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def merge_for_resume(saved: TrainConfig, given: dict) -> TrainConfig:
    """The saved run's config with the runtime fields the user changed.

    A flag that changes the optimisation (lr, batch size, data, ...) must match the saved run:
    resuming is meant to continue the same run exactly, so a silent change is refused.
    """
    changes: dict = {"stop_after": None}  # a stop point belongs to one invocation
    for name, value in given.items():
        if value is None:
            continue
        if name in RUNTIME_FIELDS:
            changes[name] = value
        elif name == "imagenet" or name == "images":
            if value is not None and saved_path(getattr(saved, name)) != saved_path(value):
                raise MgdedupError(f"--{name} {value} differs from the resumed run's "
                                   f"{getattr(saved, name)}")
        elif _differs(getattr(saved, name, None), value):
            flag = name.replace("_", "-")
            raise MgdedupError(f"--{flag} {value} differs from the resumed run "
                               f"({getattr(saved, name, None)}); resuming keeps the saved settings")
    return saved.replace(**changes)


def saved_path(value: str | None) -> str | None:
    return None if value is None else str(Path(value).expanduser().resolve())


def _differs(saved: object, given: object) -> bool:
    if isinstance(saved, float) or isinstance(given, float):
        try:
            return abs(float(saved) - float(given)) > 1e-12 * max(1.0, abs(float(saved)))
        except (TypeError, ValueError):
            return True
    if isinstance(saved, (list, tuple)) or isinstance(given, (list, tuple)):
        return list(saved or []) != list(given or [])
    return saved != given
