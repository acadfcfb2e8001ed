"""The MultiGrain training loop behind `mgdedup train` (entry point: `run_training`).

One process per device; under `torchrun` (WORLD_SIZE > 1) the processes form a DDP group
(NCCL on CUDA, gloo on CPU), each draws its own RA groups (the sampler splits every global
batch by rank) and gradients, the margin beta included, are averaged. Only rank 0 writes files.

Exact resume: the augmentation of every sample is seeded from its (epoch, iteration, rank,
position) (see mgdedup.training.data), the margin loss's negative sampling from (iteration,
rank), and a checkpoint holds optimizer, scheduler, beta, sampler position and RNG states; a
run interrupted at any iteration and resumed computes the same batches and the same steps.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

from mgdedup.cpus import die_with_parent
from mgdedup.errors import MgdedupError
from mgdedup.files.atomic import write_text
from mgdedup.model.batchnorm import fold_batchnorm
from mgdedup.model.fingerprint import weights_fingerprint
from mgdedup.model.model_file import load_model_file, model_from_dict, save_model
from mgdedup.model.multigrain import ModelInfo, MultiGrainModel
from mgdedup.model.pooling import GeM
from mgdedup.training.checkpoints import (
    load_checkpoint,
    rng_states,
    save_checkpoint,
    set_rng_states,
)
from mgdedup.training.config import TrainConfig, merge_for_resume
from mgdedup.training.copy_validation import (
    DISTRACTORS,
    MIN_AGREEMENT,
    CopyValidation,
    split_held_out,
)
from mgdedup.training.data import (
    AugmentedImages,
    EvalImages,
    FileList,
    SeededBatches,
    build_augmentation,
    class_names_for,
    collate_eval,
    imagefolder_split,
    seed_worker,
    unlabelled_files,
)
from mgdedup.training.freezing import freeze_early_blocks
from mgdedup.training.margin_loss import BETA0, MarginLoss, balanced_beta
from mgdedup.training.objective import joint_loss
from mgdedup.training.sampler import RepeatedAugmentationSampler

log = logging.getLogger(__name__)

Progress = Callable[[dict], None]
CHECKPOINT_NAME = "last.ckpt"
BEST_NAME = "best.pt"  # --images: the model that retrieved the held-out copies best so far
METRICS_NAME = "metrics.jsonl"
VAL_BATCH = 50


# --- the network being trained ------------------------------------------------------------
class TrainingNet(nn.Module):
    """Trunk + GeM + margin loss in one module, so DDP averages every gradient, beta's too.

    forward returns plain tensors (total, classification, margin, distillation, active pairs):
    what DDP can trace. Terms that the run does not compute come back as 0.
    """

    def __init__(self, model: MultiGrainModel, margin: MarginLoss, freeze_bn: bool = False
                 ) -> None:
        super().__init__()
        self.trunk = model.trunk
        self.pool = model.pool
        self.margin = margin
        self.freeze_bn = freeze_bn

    def train(self, mode: bool = True) -> TrainingNet:
        """With `freeze_bn`, BatchNorm layers stay in eval mode: running statistics are used
        and kept (fine-tuning with small batches); their affine weights still learn."""
        super().train(mode)
        if mode and self.freeze_bn:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def embed(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(GeM vectors in float32, logits): GeM itself runs in float32 (x^p underflows fp16)."""
        features = self.trunk.forward_features(images)
        with torch.autocast(device_type=images.device.type, enabled=False):
            g = self.pool(features.float())
        return g, self.trunk.classifier(g)

    def forward(self, images: Tensor, labels: Tensor | None, instance_ids: Tensor,
                teacher_logits: Tensor | None, generator: torch.Generator | None,
                lam: float, temperature: float) -> tuple[Tensor, ...]:
        g, logits = self.embed(images)
        terms = joint_loss(logits.float(), labels, g, instance_ids, self.margin, lam,
                           teacher_logits=teacher_logits, generator=generator,
                           temperature=temperature)
        zero = terms.total.new_zeros(())
        return (terms.total,
                zero if terms.classification is None else terms.classification,
                zero if terms.margin is None else terms.margin,
                zero if terms.distillation is None else terms.distillation,
                torch.tensor(float(terms.active_pairs)))


class Teacher(nn.Module):
    """Frozen copy of the initial model: its logits are the distillation targets."""

    def __init__(self, model: MultiGrainModel) -> None:
        super().__init__()
        self.trunk = copy.deepcopy(model.trunk).eval()
        self.pool = GeM(float(model.pool.p))
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        features = self.trunk.forward_features(images)
        with torch.autocast(device_type=images.device.type, enabled=False):
            g = self.pool(features.float())
        return self.trunk.classifier(g).float()

    def train(self, mode: bool = True) -> Teacher:  # always eval: BN keeps its statistics
        return super().train(False)


# --- distributed plumbing ----------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_type: str) -> Dist:
    """Join the torchrun group (env vars WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT)."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), int(os.environ.get("LOCAL_RANK", dist.get_rank())),
                    dist.get_world_size())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    log.info("DDP: rank %d of %d (%s)", dist.get_rank(), world, backend)
    return Dist(dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), world, owns_group=True)


def pick_device(config: TrainConfig, local_rank: int) -> torch.device:
    name = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise MgdedupError("--device cuda: no CUDA device is available")
        return torch.device("cuda", local_rank)
    try:
        return torch.device(name)
    except RuntimeError:
        raise MgdedupError(f"unknown --device '{name}' (cpu, cuda, cuda:N)") from None


def average_buffers(module: nn.Module, world: Dist) -> None:
    """BatchNorm statistics are per rank (DDP only broadcasts them before a forward): average
    them so that every rank, and the saved model, hold the same network."""
    if world.world_size <= 1:
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer.div_(world.world_size)
        else:
            dist.broadcast(buffer, src=0)


# --- building the run ----------------------------------------------------------------------
def load_init_model(spec: str) -> MultiGrainModel:
    """A private copy of --init (the registry caches its models: training must not touch it)."""
    from mgdedup.model.registry import load_model

    return copy.deepcopy(load_model(spec))


def fresh_resnet50(config: TrainConfig, class_names: list[str]) -> MultiGrainModel:
    from mgdedup.model.trunks import build_trunk

    torch.manual_seed(config.seed)
    trunk = build_trunk("resnet50")
    name = Path(config.out_path()).stem
    info = ModelInfo(name=name, trunk="resnet50", training_p=config.p, class_names=class_names,
                     source=f"mgdedup train (MultiGrain p={config.p:g}, lam={config.lam:g})")
    return MultiGrainModel(trunk, info)


def prepare_pool(model: MultiGrainModel, config: TrainConfig) -> None:
    """GeM with the training p, a parameter when --learn-p."""
    if config.learn_p:
        model.pool = GeM(config.p, learn_p=True)
    else:
        model.pool = GeM(config.p)
    model.info.training_p = float(config.p)


def fingerprint_of(model: MultiGrainModel) -> str:
    """The weights' identity now: `MultiGrainModel.fingerprint` is cached, and training
    changes the weights in place."""
    return weights_fingerprint(model.trunk, model.info.trunk)


class Trainer:
    """One run: data, model, optimiser, schedule, checkpoints. `fit()` trains to the end (or
    to `stop_after`) and returns the model file written (or the checkpoint, when stopped)."""

    def __init__(self, config: TrainConfig, progress: Progress | None = None,
                 model: MultiGrainModel | None = None) -> None:
        self.progress = progress
        resumed: tuple[dict, dict] | None = None
        if config.resume is not None:
            data, training = load_checkpoint(Path(config.resume).expanduser())
            saved = TrainConfig.from_dict(training["config"])
            given = {k: v for k, v in config.to_dict().items() if v != getattr(TrainConfig(), k)}
            given.setdefault("run_dir", str(Path(config.resume).expanduser().parent))
            config = merge_for_resume(saved, given)
            resumed = (data, training)
        config.validate()
        self.config = config
        self.device = pick_device(config, int(os.environ.get("LOCAL_RANK", "0")))
        self.world = setup_distributed(self.device.type)
        if not self.world.main:  # rank 0 speaks for the group
            logging.getLogger("mgdedup").setLevel(logging.ERROR)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True
        if config.batch_size % self.world.world_size:
            raise MgdedupError(f"--batch-size {config.batch_size} must be a multiple of the "
                               f"number of processes ({self.world.world_size})")
        self.run_dir = config.run_path()
        self.out = config.out_path()
        self.checkpoint_path = self.run_dir / CHECKPOINT_NAME
        if resumed is None and self.checkpoint_path.exists():
            raise MgdedupError(f"{self.run_dir} already holds a run: continue it with --resume "
                               f"{self.checkpoint_path}, or choose another --run-dir")

        # data
        self.train_files, self.val_files = self._file_lists()
        self.held_out: list[Path] = []
        if config.finetuning and config.select_best:
            self.train_files, self.held_out = self._hold_out(self.train_files)
        self.copy_validation: CopyValidation | None = None
        self.initial_score: dict | None = None  # held-out copy retrieval of the initial model
        self.best: dict | None = None  # ... and of the best model so far (in best.pt)
        self.initial_top1: list[int] | None = None  # its classes: the agreement reference
        self.labelled = not config.finetuning
        self.dataset = AugmentedImages(self.train_files,
                                       build_augmentation(config.augment, config.resolution),
                                       config.resolution)
        self.sampler = RepeatedAugmentationSampler(
            len(self.dataset), config.batch_size, config.repeats,
            iters_per_epoch=config.iters_per_epoch, seed=config.seed, rank=self.world.rank,
            world_size=self.world.world_size)
        if config.lam < 1.0 and self.sampler.groups_per_rank < 2:
            raise MgdedupError(
                f"a batch of {config.batch_size} over {self.world.world_size} process(es) with "
                f"--repeats {config.repeats} holds one image per process: the margin loss needs "
                f"at least 2 (batch >= {2 * config.repeats * self.world.world_size})")

        # model
        self.model = self._build_model(model, resumed)
        self.teacher = None
        if config.finetuning:
            initial, self.teacher_fp = (self.model, "") if resumed is None \
                else self._initial_model()
            self.teacher = Teacher(initial).to(self.device)
        if config.train_blocks is not None:
            frozen = freeze_early_blocks(self.model.trunk, config.train_blocks)
            log.info("training the last %d trunk blocks: %d parameters frozen",
                     config.train_blocks, frozen)
        self.margin = MarginLoss(beta0=config.beta0 if config.beta0 is not None else BETA0)
        self.net = TrainingNet(self.model, self.margin, config.frozen_bn).to(self.device)
        self.net.train()
        self.amp = config.amp if config.amp is not None else self.device.type == "cuda"
        self.amp_dtype = torch.bfloat16
        if self.device.type == "cuda":
            self.net.to(memory_format=torch.channels_last)
            if not torch.cuda.is_bf16_supported():
                self.amp_dtype = torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp
                                           and self.amp_dtype == torch.float16)
        self.ddp: nn.Module = self.net
        if self.world.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=not 0.0 < config.lam < 1.0)

        # optimisation
        self.optimizer = self._optimizer()
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=config.lr_milestones, gamma=config.gamma)
        self.epoch, self.epoch_iteration, self.iteration = 0, 0, 0
        self.generator = torch.Generator(device=self.device)
        if resumed is not None:
            self._restore(resumed[1])

    # --- construction helpers ------------------------------------------------------------
    def _file_lists(self) -> tuple[FileList, FileList | None]:
        config = self.config
        if config.images is not None:
            root = Path(config.images).expanduser()
            if not root.is_dir():
                raise MgdedupError(f"no such folder: {root}")
            return unlabelled_files(root), None
        root = Path(config.imagenet).expanduser()
        if not root.is_dir():
            raise MgdedupError(f"no such folder: {root}")
        train = imagefolder_split(root, "train")
        val = imagefolder_split(root, "val", train.classes) if (root / "val").exists() else None
        return train, val

    def _hold_out(self, files: FileList) -> tuple[FileList, list[Path]]:
        """A tenth of --images (by a hash of the path) leaves training to score checkpoints."""
        keep, held = split_held_out(files.paths, Path(str(self.config.images)).expanduser())
        if not held:
            log.info("%d images: too few to hold some out for validation, so the model of the "
                     "last iteration is kept", len(files.paths))
            return files, []
        log.info("%d of %d images held out of training to score copy retrieval", len(held),
                 len(files.paths))
        return (FileList([files.paths[i] for i in keep], [files.labels[i] for i in keep],
                         files.classes), [files.paths[i] for i in held])

    def _build_model(self, given: MultiGrainModel | None,
                     resumed: tuple[dict, dict] | None) -> MultiGrainModel:
        config = self.config
        if resumed is not None:
            data, training = resumed
            if given is not None:
                given.trunk.load_state_dict(data["state_dict"], strict=True)
                model = given
            else:
                model = model_from_dict(data, origin=str(config.resume))
            prepare_pool(model, config)
            model.pool.load_state_dict(training["pool"])
            model.info.training_p = float(model.pool.p)
            return model.train()
        if given is not None:
            model = given
        elif config.init is not None:
            model = load_init_model(config.init)
        else:
            model = fresh_resnet50(config, [])
        if self.labelled:
            classes = self.train_files.classes
            outputs = model.trunk.classifier.out_features
            if len(classes) > outputs:
                raise MgdedupError(f"{len(classes)} classes but the {model.info.trunk} "
                                   f"classifier has {outputs} outputs")
            if len(classes) < outputs:
                log.info("%d classes: training the first %d of the %d classifier outputs",
                         len(classes), len(classes), outputs)
            model.info.class_names = class_names_for(classes)
        if config.init is not None:
            if model.whitenings and config.finetuning and config.whiten:
                log.info("the whitenings of %s do not fit the new weights: refitted on the "
                         "training images at the end", config.init)
            elif model.whitenings:
                log.warning("the whitenings of %s do not fit the new weights: dropped (run "
                            "`mgdedup whiten` on the trained model)", config.init)
            model.whitenings = {}
            model.info.p_star = {}  # measured for the old weights
            model.info.name = Path(config.out_path()).stem
            model.info.source = (f"mgdedup train from {config.init} "
                                 f"({'unlabelled' if config.finetuning else 'labelled'}, "
                                 f"p={config.p:g}, lam={config.lam:g})")
        self.initial_fingerprint = fingerprint_of(model)
        prepare_pool(model, config)
        if config.frozen_bn:
            log.info("frozen BatchNorm folded into %d convolutions", fold_batchnorm(model.trunk))
        return model.train()

    def _initial_model(self) -> tuple[MultiGrainModel, str]:
        """The teacher of a resumed fine-tuning run and its fingerprint: --init again, prepared
        exactly as at the start (folded BatchNorm included) so the teacher's logits are too."""
        model = load_init_model(self.config.init)
        fingerprint = fingerprint_of(model)
        prepare_pool(model, self.config)
        if self.config.frozen_bn:
            fold_batchnorm(model.trunk)
        return model, fingerprint

    def _optimizer(self) -> torch.optim.Optimizer:
        """SGD; beta gets its own lr (beta_lr_factor x lr) and, like a learned p, no decay."""
        config = self.config
        base = config.base_lr
        trunk_params = [p for p in self.net.trunk.parameters() if p.requires_grad]
        groups = [{"params": trunk_params, "name": "trunk"},
                  {"params": [self.margin.beta], "name": "beta",
                   "lr": base * config.beta_lr_factor, "weight_decay": 0.0}]
        if config.learn_p:
            groups.append({"params": [self.net.pool.p], "name": "p", "weight_decay": 0.0})
        return torch.optim.SGD(groups, lr=base, momentum=config.momentum,
                               weight_decay=config.weight_decay)

    def _restore(self, training: dict) -> None:
        self.margin.load_state_dict(training["margin"])
        self.optimizer.load_state_dict(training["optimizer"])
        self.scheduler.load_state_dict(training["scheduler"])
        if training.get("scaler"):
            self.scaler.load_state_dict(training["scaler"])
        saved_world = training["sampler"]["world_size"]
        if saved_world != self.world.world_size:
            raise MgdedupError(f"the run was saved with {saved_world} processes, this one has "
                               f"{self.world.world_size}: resume with the same number")
        try:
            self.sampler.load_state_dict({**training["sampler"], "rank": self.world.rank})
        except ValueError as error:
            raise MgdedupError(f"cannot resume: {error}") from None
        self.epoch = self.sampler.epoch
        self.epoch_iteration = self.sampler.start_iteration
        self.iteration = int(training["iteration"])
        saved_initial = training.get("initial_fingerprint", "")
        if self.teacher is not None and saved_initial and saved_initial != self.teacher_fp:
            raise MgdedupError(f"--init {self.config.init} is not the model this run "
                                   f"started from")
        self.initial_fingerprint = training.get("initial_fingerprint", "")
        selection = training.get("selection") or {}
        self.initial_score = selection.get("initial")
        self.best = selection.get("best")
        self.initial_top1 = selection.get("initial_top1")
        set_rng_states(training["rng"])
        log.info("resumed at epoch %d, iteration %d", self.epoch, self.iteration)

    # --- bookkeeping ----------------------------------------------------------------------
    def _emit(self, record: dict, write: bool = True) -> None:
        if not self.world.main:
            return
        if write:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / METRICS_NAME, "a", encoding="utf-8") as fp:
                fp.write(json.dumps(record) + "\n")
        if self.progress is not None:
            self.progress(record)

    def _trim_metrics(self) -> None:
        """After a resume, drop the records of iterations the checkpoint does not contain."""
        path = self.run_dir / METRICS_NAME
        if not self.world.main or not path.exists():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("iteration", 0) <= self.iteration:
                kept.append(line)
        write_text(path, "".join(line + "\n" for line in kept), "training metrics")

    def save(self) -> None:
        """last.ckpt at the current position (rank 0 only; every rank holds the same state)."""
        average_buffers(self.net, self.world)
        if not self.world.main:
            return
        self.model.info.training_p = float(self.model.pool.p.detach())
        if self.sampler.epoch != self.epoch:  # at an epoch end: the next epoch's start
            self.sampler.set_epoch(self.epoch, 0)
        training = {
            "epoch": self.epoch, "epoch_iteration": self.epoch_iteration,
            "iteration": self.iteration,
            "sampler": self.sampler.state_dict(self.epoch_iteration),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "margin": self.margin.state_dict(),
            "pool": self.model.pool.state_dict(),
            "rng": rng_states(),
            "config": self.config.to_dict(),
            "initial_fingerprint": getattr(self, "initial_fingerprint", ""),
            "selection": {"initial": self.initial_score, "best": self.best,
                          "initial_top1": self.initial_top1},
        }
        save_checkpoint(self.checkpoint_path, self.model, training)  # mode is not stored
        log.info("checkpoint %s (epoch %d, iteration %d)", self.checkpoint_path, self.epoch,
                 self.iteration)

    # --- training -------------------------------------------------------------------------
    def _loader(self) -> DataLoader:
        config = self.config
        return DataLoader(self.dataset, batch_sampler=SeededBatches(self.sampler, config.seed,
                                                                 config.original_views),
                          num_workers=config.workers, worker_init_fn=seed_worker,
                          pin_memory=self.device.type == "cuda",
                          persistent_workers=False)

    @torch.no_grad()
    def _estimate_beta0(self, images: Tensor, ids: Tensor) -> None:
        """Fine-tuning: start beta between the initial model's mean copy distance and mean
        other-image distance on the first RA batch (see `balanced_beta`), averaged over ranks.
        It is the first training batch, just before its step, so a run stays a function of its
        config; BatchNorm in eval mode, so no statistic moves."""
        self.net.eval()
        with self._autocast():
            g, _ = self.net.embed(images.to(self.device))
        self.net.train()
        found = balanced_beta(g, ids.to(self.device))
        if found is None:
            return
        values = torch.tensor(found, dtype=torch.float64, device=self.device)
        if self.world.world_size > 1:
            dist.all_reduce(values)
            values /= self.world.world_size
        beta, positive, negative = values.tolist()
        self.margin.beta.fill_(beta)
        self._emit({"event": "beta0", "iteration": 0, "epoch": 0, "beta": beta,
                    "copy_distance": positive, "other_distance": negative})
        log.info("margin beta starts at %.3f (copies %.3f apart, other images %.3f)",
                 beta, positive, negative)

    def _autocast(self) -> object:
        if not self.amp:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def step(self, images: Tensor, labels: Tensor, ids: Tensor) -> dict[str, float]:
        """One SGD step on one RA batch; returns the loss terms as floats."""
        config = self.config
        images = images.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        ids = ids.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True) if self.labelled else None
        # negative sampling: a pure function of (seed, iteration, rank), hence resumable
        self.generator.manual_seed(
            (config.seed * 1_000_003 + self.iteration) * 1031 + self.world.rank)
        with self._autocast():
            teacher_logits = self.teacher(images) if self.teacher is not None else None
            total, ce, margin, distill, active = self.ddp(
                images, labels, ids, teacher_logits, self.generator, config.lam,
                config.temperature)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        values = torch.stack([total.detach(), ce.detach(), margin.detach(), distill.detach()])
        loss, ce_value, margin_value, distill_value = values.tolist()
        if not math.isfinite(loss):
            raise MgdedupError(f"the loss became {loss} at iteration {self.iteration}: lower "
                               f"--lr (now {self.config.base_lr:g})")
        return {"loss": loss, "classification": ce_value, "margin": margin_value,
                "distillation": distill_value, "active_pairs": float(active)}

    def fit(self) -> Path:
        config = self.config
        epochs = config.num_epochs
        iters = len(self.sampler)
        if self.world.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if config.resume is not None:
                self._trim_metrics()
        self._emit({"event": "resume" if config.resume else "start", "iteration": self.iteration,
                    "epoch": self.epoch, "images": len(self.dataset),
                    "world_size": self.world.world_size, "iters_per_epoch": iters,
                    "epochs": epochs, "config": config.to_dict()})
        estimate_beta0 = self.iteration == 0 and config.resume is None \
            and config.finetuning and config.beta0 is None and config.lam < 1.0
        rank_batch = self.sampler.rank_batch_size
        if self.initial_score is None:
            self._validate_copies()  # the initial model: the score to beat
        while self.epoch < epochs:
            self.net.train()
            self.sampler.set_epoch(self.epoch, self.epoch_iteration)
            window: dict[str, float] = {}
            totals: dict[str, float] = {}
            steps_in_window, steps_in_epoch, window_start = 0, 0, time.perf_counter()
            self._emit({"event": "epoch_start", "epoch": self.epoch, "iteration": self.iteration,
                        "epoch_iteration": self.epoch_iteration, "iters_per_epoch": iters,
                        "epochs": epochs}, write=False)
            for images, labels, ids in self._loader():
                if estimate_beta0:
                    self._estimate_beta0(images, ids)
                    estimate_beta0 = False
                terms = self.step(images, labels, ids)
                self.iteration += 1
                self.epoch_iteration += 1
                steps_in_window += 1
                steps_in_epoch += 1
                for key, value in terms.items():
                    window[key] = window.get(key, 0.0) + value
                    totals[key] = totals.get(key, 0.0) + value
                elapsed = time.perf_counter() - window_start
                rate = steps_in_window * rank_batch * self.world.world_size / max(elapsed, 1e-9)
                record = {"event": "train", "epoch": self.epoch, "iteration": self.iteration,
                          "epoch_iteration": self.epoch_iteration,
                          **{k: v / steps_in_window for k, v in window.items()},
                          "beta": float(self.margin.beta.detach()),
                          "p": float(self.model.pool.p.detach()),
                          "lr": self.optimizer.param_groups[0]["lr"], "img_per_s": rate}
                logged = (self.iteration % config.log_every == 0
                          or self.epoch_iteration == iters)
                self._emit({**record, "event": "step", **terms}, write=False)
                if logged:
                    self._emit(record)
                    window, steps_in_window, window_start = {}, 0, time.perf_counter()
                if config.validate_every and self.iteration % config.validate_every == 0 \
                        and self.epoch_iteration < iters:
                    self._validate_copies()
                if config.save_every and self.iteration % config.save_every == 0 \
                        and self.epoch_iteration < iters:
                    self.save()
                if config.stop_after is not None and self.iteration >= config.stop_after \
                        and self.epoch_iteration < iters:
                    self.save()
                    return self._finish(stopped=True)
            summary = {"event": "epoch", "epoch": self.epoch, "iteration": self.iteration,
                       "lr": self.optimizer.param_groups[0]["lr"],
                       **{k: v / max(steps_in_epoch, 1) for k, v in totals.items()}}
            average_buffers(self.net, self.world)
            if self.val_files is not None:
                summary.update(self.validate())
            summary.update(self._validate_copies())
            self.scheduler.step()
            self.epoch += 1
            self.epoch_iteration = 0
            self.save()
            self._emit(summary)
            if config.stop_after is not None and self.iteration >= config.stop_after:
                return self._finish(stopped=self.epoch < epochs)
        return self._finish(stopped=False)

    def _finish(self, stopped: bool) -> Path:
        if stopped:
            self._emit({"event": "stopped", "iteration": self.iteration, "epoch": self.epoch})
            return self.checkpoint_path
        if self.world.main:
            self.model.info.training_p = float(self.model.pool.p.detach())
            self.model.eval()
            self._select_best()
            if self.config.finetuning and self.config.whiten:
                self._refit_whitenings()
            save_model(self.model, self.out)
            self._emit({"event": "done", "iteration": self.iteration, "epoch": self.epoch,
                        "out": str(self.out)})
        return self.out

    # --- held-out copy retrieval (--images) ------------------------------------------------
    def _validate_copies(self) -> dict[str, float]:
        """Score the current model on the held-out copies (rank 0); a new best (that still
        classifies like the initial model) is written to best.pt. Returns the epoch summary's
        fields."""
        if not self.held_out or not self.world.main:
            return {}
        if self.copy_validation is None:
            paths = self.train_files.paths
            step = max(1, len(paths) // DISTRACTORS)
            self.copy_validation = CopyValidation(self.held_out, paths[::step][:DISTRACTORS],
                                                  self.config.resolution, seed=self.config.seed)
            if not len(self.copy_validation):
                log.warning("none of the held-out images could be read: the model of the last "
                            "iteration is kept")
                self.held_out = []
                return {}

        def embed(images: Tensor) -> tuple[Tensor, Tensor]:
            with self._autocast():
                return self.net.embed(images)

        self.net.eval()
        with torch.no_grad():
            scored = self.copy_validation.score(embed, self.device, self.initial_top1)
        self.net.train()
        if self.initial_top1 is None:  # the first model scored is the initial one
            self.initial_top1 = scored.top1
        score = scored.to_dict()
        record = {**score, "iteration": self.iteration, "epoch": self.epoch}
        if self.initial_score is None:
            self.initial_score = record
        improved = score["agreement"] >= MIN_AGREEMENT and (
            self.best is None or score["map_whitened"] > self.best["map_whitened"])
        if improved:
            self.model.info.training_p = float(self.model.pool.p.detach())
            save_model(self.model, self.run_dir / BEST_NAME)
            self.best = {**record, "fingerprint": fingerprint_of(self.model)}
        self._emit({"event": "copy_validation", **record, "best": improved})
        return {"copy_map": score["map_whitened"], "copy_agreement": score["agreement"]}

    def _select_best(self) -> None:
        """Before the model is written: load best.pt's weights when a checkpoint other than
        the last retrieved the held-out copies best, and say what was kept and why."""
        best, initial = self.best, self.initial_score
        if best is None or initial is None:
            return
        if best["iteration"] != self.iteration:
            path = self.run_dir / BEST_NAME
            try:
                chosen = load_model_file(path)
            except MgdedupError as error:
                log.warning("cannot read %s (%s): keeping the last model", path, error)
                return
            if fingerprint_of(chosen) != best["fingerprint"]:
                log.warning("%s is not the model this run recorded as its best: keeping the "
                            "last model", path)
                return
            self.model.trunk.load_state_dict(chosen.trunk.state_dict())
            self.model.pool.set_p(float(chosen.info.training_p))
            self.model.info.training_p = float(chosen.info.training_p)
        self._emit({"event": "selected", "iteration": best["iteration"], "epoch": best["epoch"],
                    "last_iteration": self.iteration, "map_whitened": best["map_whitened"],
                    "initial_map_whitened": initial["map_whitened"],
                    "agreement": best["agreement"]})
        if best["iteration"] == 0:
            log.warning("fine-tuning did not improve copy retrieval on the %d held-out images "
                        "(mAP %.3f at the start): the model written is the initial one",
                        len(self.held_out), initial["map_whitened"])
        else:
            log.info("kept iteration %d: held-out copy mAP %.3f -> %.3f, top-1 agreement %.2f",
                     best["iteration"], initial["map_whitened"], best["map_whitened"],
                     best["agreement"])

    def _refit_whitenings(self) -> None:
        """Fine-tuning changed the descriptors, so the initial model's whitenings no longer fit:
        fit new ones at the same resolutions on the training images (unlabelled photos of the
        collection itself, as the paper fits on unlabelled images), with a calibrated default
        threshold each, so the model file works in `index` / `dedup` as it is."""
        from mgdedup.model.registry import load_model
        from mgdedup.tuning.whiten import whiten_model

        resolutions = sorted(load_model(str(self.config.init)).whitenings)  # read only: no copy
        root = Path(str(self.config.images)).expanduser()
        for resolution in resolutions:
            self._emit({"event": "whiten", "resolution": resolution, "iteration": self.iteration,
                        "epoch": self.epoch})
            try:
                self.model, report = whiten_model(self.model, [root], resolution,
                                                  workers=self.config.workers,
                                                  device=str(self.device))
            except MgdedupError as error:  # the trained weights are saved all the same
                log.warning("no whitening at s*=%d (%s): fit one with `mgdedup whiten`",
                            resolution, error)
                continue
            log.info("whitening at s*=%d fitted on %d images (%d dims)", resolution,
                     report.images, report.dim)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Top-1 / top-5 on the val split at the test protocol (resize 256, centre crop 224
        for s* = 224), GeM at the training p; every rank evaluates its share."""
        self.net.eval()
        files = self.val_files
        dataset = EvalImages(files, self.config.resolution)
        indices = list(range(self.world.rank, len(dataset), self.world.world_size))
        loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=VAL_BATCH,
                            num_workers=self.config.workers, collate_fn=collate_eval,
                            worker_init_fn=die_with_parent)
        counts = torch.zeros(3, dtype=torch.float64, device=self.device)
        for images, labels in loader:
            if images.numel() == 0:
                continue
            images = images.to(self.device, non_blocking=True)
            if self.device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            labels = labels.to(self.device)
            with self._autocast():
                _, logits = self.net.embed(images)
            top5 = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
            hits = top5 == labels[:, None]
            counts += torch.tensor([hits[:, 0].sum().item(), hits.any(dim=1).sum().item(),
                                    len(labels)], dtype=torch.float64, device=self.device)
        if self.world.world_size > 1:
            dist.all_reduce(counts)
        self.net.train()
        top1, top5, n = counts.tolist()
        return {"val_top1": top1 / max(n, 1), "val_top5": top5 / max(n, 1), "val_images": int(n)}

    def close(self) -> None:
        if self.world.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def run_training(config: TrainConfig, progress: Progress | None = None) -> Path:
    """Train as `config` says; returns the model file written (or last.ckpt when the run was
    stopped early by `stop_after`). Every rank of a torchrun group calls this."""
    trainer = Trainer(config, progress)
    try:
        return trainer.fit()
    finally:
        trainer.close()
