"""A tiny training run for tests/test_distributed.py, launched by ``torchrun`` (or called in one process).

    torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py OUT [--kill-rank R --kill-step S] [--amp bf16|fp16]
        [--device cuda]

Trains an MLP without dropout (so one process and N processes draw no different random numbers)
on seeded synthetic images through ``Classifier.fit``; rank 0 saves the final weights to
``OUT/weights.pt`` and the run's checkpoint is ``OUT/checkpoint.pt``.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch

N_IMAGES, BATCH, EPOCHS = 100, 16, 2  # 75 training images: a last global batch of 11 (6 + 5)


def data(n: int = N_IMAGES):
    """Seeded images (N, 3, 8, 8) whose labels follow their mean brightness (learnable in 2 epochs)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    labels = (images.float().mean((1, 2, 3)) > 127.5).long() + 2 * (images[:, 0].float().mean((1, 2)) > 127.5).long()
    return images, labels


def make_classifier(amp: str | None = None, device: str = "cpu"):
    from imclass import models
    from imclass.train import Classifier

    torch.manual_seed(0)
    model = models.create("mlp", num_classes=4, in_chans=3, img_size=8, hidden=[32])
    clf = Classifier(model, classes=list("abcd"), device=device)
    return clf.compile("sgd", lr=0.2, momentum=0.9, weight_decay=1e-4, amp=amp)


class KillAt:
    """Kill this process (SIGKILL: no clean-up) at optimizer step ``step`` on rank ``rank``."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_batch_end(self, state) -> None:
        from imclass.train import distributed

        if distributed.rank() == self.rank and state.step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def train(out: Path, epochs: int = EPOCHS, resume: bool = False, callbacks=(), amp: str | None = None,
          device: str = "cpu"):
    """Fit the tiny model (1 process or, under torchrun, N), in float32 or under ``amp`` autocast, on
    ``device`` (``cuda``: each rank on its LOCAL_RANK GPU, NCCL); returns the classifier."""
    clf = make_classifier(amp, device)
    clf.fit(data(), epochs=epochs, batch_size=BATCH, validation=0.25, seed=3, checkpoint_dir=out, resume=resume,
            verbose=False, callbacks=list(callbacks))
    return clf


def main() -> None:
    from imclass.train import distributed

    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--kill-rank", type=int, default=None)
    parser.add_argument("--kill-step", type=int, default=3)
    parser.add_argument("--amp", default=None, choices=[None, "bf16", "fp16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    with distributed.session(args.device, timeout_s=float(os.environ.get("IMCLASS_DIST_TIMEOUT", 60))):
        callbacks = [KillAt(args.kill_rank, args.kill_step)] if args.kill_rank is not None else []
        clf = train(args.out, callbacks=callbacks, amp=args.amp, device=args.device)
        if distributed.is_main():
            torch.save({k: v.detach().cpu().clone() for k, v in clf.model.state_dict().items()}, args.out / "weights.pt")
            torch.save(clf.history.to_dict(), args.out / "history.pt")
    sys.exit(0)


if __name__ == "__main__":
    main()
