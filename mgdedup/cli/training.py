"""`mgdedup train`: MultiGrain training from the command line (issue 7).

The training machinery is imported only when the command runs, so the other commands never
load it. Under `torchrun` every process runs this same command; only rank 0 prints and writes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from mgdedup.cli.shell import app, progress_bar, say, user_errors
from mgdedup.errors import MgdedupError


def _milestones(text: str | None) -> list[int] | None:
    if text is None:
        return None
    if text.strip() in ("", "none"):
        return []
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise MgdedupError(f"--milestones takes comma-separated epochs like 30,60,90, "
                           f"got '{text}'") from None


@app.command()
@user_errors
def train(
    imagenet: Annotated[Path | None, typer.Option(
        "--imagenet", help="Labelled data in the ImageNet layout: ROOT/train/<class>/*, "
                           "optional ROOT/val/<class>/* (top-1/top-5 after each epoch).")] = None,
    images: Annotated[Path | None, typer.Option(
        "--images", help="Unlabelled images to fine-tune on (needs --init): margin loss on "
                         "augmented copies, classifier kept by distillation.")] = None,
    init: Annotated[str | None, typer.Option(
        "--init", help="Start from this model: 'default' (EfficientNet-Lite0) or a model "
                       "file. Default: ResNet-50 from scratch.")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Final model file. Default: RUN_DIR/model.pt.")] = None,
    run_dir: Annotated[Path | None, typer.Option(
        "--run-dir", help="Checkpoint (last.ckpt) and metrics.jsonl. Default: OUT without "
                          "its suffix plus .run, e.g. weights/mg-r50.run.")] = None,
    resume: Annotated[Path | None, typer.Option(
        "--resume", help="Continue the run of this last.ckpt exactly where it stopped.")] = None,
    epochs: Annotated[int | None, typer.Option(
        "--epochs", help="Default 120 (paper); 2 when fine-tuning with --images.")] = None,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", "-b", help="Global batch over all processes (paper 512).")] = None,
    repeats: Annotated[int | None, typer.Option(
        "--repeats", help="Augmented copies of each image in a batch, m (paper 3).")] = None,
    lam: Annotated[float | None, typer.Option(
        "--lam", help="Weight of classification (or distillation) vs margin loss "
                      "(paper 0.5).")] = None,
    p: Annotated[float | None, typer.Option("--p", help="GeM exponent (paper 3).")] = None,
    learn_p: Annotated[bool | None, typer.Option(
        "--learn-p/--fixed-p", help="Learn the GeM exponent (default: fixed).")] = None,
    freeze_bn: Annotated[bool | None, typer.Option(
        "--freeze-bn/--train-bn", help="Keep BatchNorm statistics fixed (default: frozen with "
                                       "--init, trained from scratch).")] = None,
    train_blocks: Annotated[int | None, typer.Option(
        "--train-blocks", min=1, help="Train only the trunk's last K blocks and the classifier "
                                      "(faster on CPU, less drift; default: every layer).")
    ] = None,
    whiten: Annotated[bool | None, typer.Option(
        "--whiten/--no-whiten", help="With --images: refit the initial model's whitenings on "
                                     "the images at the end (default), so the model is ready "
                                     "for index/dedup.")] = None,
    select_best: Annotated[bool | None, typer.Option(
        "--select-best/--keep-last", help="With --images: hold a tenth of the images (at most "
                                          "100) out of training, score copy retrieval on them "
                                          "at the start and after each epoch, and write the "
                                          "best model (default): never one that retrieves "
                                          "them worse than the initial model; --keep-last "
                                          "trains on every image "
                                          "and writes the last model.")] = None,
    original_view: Annotated[bool | None, typer.Option(
        "--original-view/--augmented-only", help="The first of the m copies of each image in "
                                                 "a batch is the image unaugmented, as index "
                                                 "sees it (default: on with --images; every "
                                                 "copy augmented with --imagenet, as the "
                                                 "paper).")] = None,
    validate_every: Annotated[int | None, typer.Option(
        "--validate-every", min=0, help="With --images: also score the held-out copies every "
                                        "N iterations (default: at epoch ends).")] = None,
    lr: Annotated[float | None, typer.Option(
        "--lr", help="Base learning rate. Default 0.2 x B/512 (1e-4 with --init).")
    ] = None,
    beta0: Annotated[float | None, typer.Option(
        "--beta0", help="Initial margin beta (paper 1.2; with --images: halfway between the "
                        "initial model's copy and other-image distances on the first batch).")
    ] = None,
    beta_lr_factor: Annotated[float | None, typer.Option(
        "--beta-lr-factor", help="Margin beta's lr = factor x lr (paper 0.1).")] = None,
    momentum: Annotated[float | None, typer.Option("--momentum", help="SGD momentum (0.9).")
                        ] = None,
    weight_decay: Annotated[float | None, typer.Option(
        "--weight-decay", help="SGD weight decay (1e-4).")] = None,
    milestones: Annotated[str | None, typer.Option(
        "--milestones", help="Epochs where lr x 0.1, comma-separated (30,60,90; none when "
                             "fine-tuning).")] = None,
    iters_per_epoch: Annotated[int | None, typer.Option(
        "--iters-per-epoch", help="Iterations per epoch. Default ceil(2 N / B) (5005 for "
                                  "ImageNet at B=512).")] = None,
    augment: Annotated[str | None, typer.Option(
        "--augment", help="full (crop, flip, colour jitter, PCA lighting) or autoaugment.")
    ] = None,
    workers: Annotated[int | None, typer.Option(
        "--workers", min=0, help="DataLoader processes per training process (default 4).")
    ] = None,
    device: Annotated[str | None, typer.Option(
        "--device", help="cpu or cuda. Default: cuda when available.")] = None,
    amp: Annotated[bool | None, typer.Option(
        "--amp/--no-amp", help="Mixed precision (default: on for CUDA).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of everything (0).")] = None,
    resolution: Annotated[int | None, typer.Option(
        "--resolution", help="Training crop and val resolution (224).")] = None,
    save_every: Annotated[int | None, typer.Option(
        "--save-every", help="Also checkpoint every N iterations (default: each epoch).")
    ] = None,
    stop_after: Annotated[int | None, typer.Option(
        "--stop-after", help="Checkpoint and stop after this many iterations in total "
                             "(e.g. before a job time limit); --resume continues.")] = None,
) -> None:
    """MultiGrain training: RA batches, classification + margin loss, GeM p.

    Examples:
      mgdedup train --imagenet /data --out weights/mg-r50.pt
      torchrun --nproc-per-node 8 -m mgdedup train --imagenet /data --out weights/mg-r50.pt
      mgdedup train --images ~/photos --init default --out tuned.pt --batch-size 24
      mgdedup train --imagenet /data --resume weights/mg-r50.run/last.ckpt
    """
    from mgdedup.training.config import TrainConfig
    from mgdedup.training.loop import run_training

    if imagenet is not None and images is not None:
        raise MgdedupError("give either --imagenet (labelled) or --images (unlabelled), not both")
    if imagenet is None and images is None and resume is None:
        raise MgdedupError("give --imagenet ROOT (labelled) or --images DIR (unlabelled "
                           "fine-tuning), or --resume a run")
    given = {
        "imagenet": imagenet, "images": images, "init": init, "out": out, "run_dir": run_dir,
        "resume": resume, "epochs": epochs, "batch_size": batch_size, "repeats": repeats,
        "lam": lam, "p": p, "learn_p": learn_p, "freeze_bn": freeze_bn,
        "train_blocks": train_blocks, "whiten": whiten, "select_best": select_best,
        "validate_every": validate_every, "original_view": original_view, "lr": lr,
        "beta0": beta0,
        "beta_lr_factor": beta_lr_factor,
        "momentum": momentum, "weight_decay": weight_decay, "milestones": _milestones(milestones),
        "iters_per_epoch": iters_per_epoch, "augment": augment, "workers": workers,
        "device": device, "amp": amp, "seed": seed, "resolution": resolution,
        "save_every": save_every, "stop_after": stop_after,
    }
    values = {k: (str(Path(v).expanduser()) if isinstance(v, Path) else v)
              for k, v in given.items() if v is not None}
    config = TrainConfig(**values)
    if resume is None:
        config.validate()
    main_process = os.environ.get("RANK", "0") == "0"  # torchrun: rank 0 speaks for all
    try:
        with progress_bar("training") as progress:
            reporter = _Reporter(progress)
            result = run_training(config, progress=reporter)
    except KeyboardInterrupt:
        if main_process:
            last = Path(config.resume) if config.resume else config.run_path() / "last.ckpt"
            say(f"interrupted; continue from the last checkpoint with --resume {last}")
        raise typer.Exit(130) from None
    if main_process:
        say(f"wrote {result}")


class _Reporter:
    """Progress events -> the rich bar (loss terms, lr, img/s) and one line per epoch."""

    def __init__(self, progress: object) -> None:
        self.progress = progress
        self.task = None
        self.epochs = 0

    def __call__(self, record: dict) -> None:
        event = record.get("event")
        if event in ("start", "resume"):
            self.epochs = int(record["epochs"])
            say(f"{'resuming' if event == 'resume' else 'training'} on "
                      f"{record['images']} images, {record['world_size']} process(es), "
                      f"{record['iters_per_epoch']} iterations per epoch, {self.epochs} "
                      f"epoch{'s' if self.epochs != 1 else ''}")
        elif event == "epoch_start":
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task(
                f"epoch {record['epoch'] + 1}/{record['epochs']}",
                total=record["iters_per_epoch"], completed=record["epoch_iteration"])
        elif event == "step" and self.task is not None:
            terms = [f"loss {record['loss']:.3f}"]
            if record.get("classification"):
                terms.append(f"ce {record['classification']:.3f}")
            if record.get("distillation"):
                terms.append(f"kl {record['distillation']:.3f}")
            terms.append(f"margin {record['margin']:.3f}")
            self.progress.update(
                self.task, completed=record["epoch_iteration"],
                description=f"epoch {record['epoch'] + 1}/{self.epochs} " + " ".join(terms)
                + f" lr {record['lr']:.3g} {record['img_per_s']:.0f} img/s")
        elif event == "whiten":
            say(f"fitting the whitening at s*={record['resolution']} on the training "
                      "images")
        elif event == "copy_validation":
            line = (f"held-out copies at iteration {record['iteration']}: mAP "
                    f"{record['map_whitened']:.4f} (l2n {record['map_l2n']:.4f}), top-1 "
                    f"agreement {100 * record['agreement']:.1f}% over {record['queries']} "
                    f"queries")
            say(line + (" (best so far)" if record["best"] else ""))
        elif event == "selected" and record["iteration"] > 0:  # 0: the trainer warns
            say(f"writing the model of iteration {record['iteration']}: held-out copy "
                      f"mAP {record['initial_map_whitened']:.4f} -> "
                      f"{record['map_whitened']:.4f}")
        elif event == "epoch":
            # one line per epoch, also in SLURM logs (not a TTY)
            say(self.epoch_line(record))

    def epoch_line(self, record: dict) -> str:
        line = (f"epoch {record['epoch'] + 1}: loss {record.get('loss', 0):.4f} "
                f"(ce {record.get('classification', 0):.4f}, "
                f"kl {record.get('distillation', 0):.4f}, margin {record.get('margin', 0):.4f})")
        if "val_top1" in record:
            line += f", val top-1 {100 * record['val_top1']:.2f}% top-5 " \
                    f"{100 * record['val_top5']:.2f}%"
        return line
