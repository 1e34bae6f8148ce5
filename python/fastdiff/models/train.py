"""Train the shipped models from a seed and write them where build_engine finds them.

    python -m fastdiff.models.train tiny-shapes --out engines/tiny-shapes --seed 0
    python -m fastdiff.models.train digits --out engines/digits --seed 0

The defaults are the settings of the shipped weights (tiny-shapes: about an hour on 2 CPU
cores; digits: a few minutes). The test suite runs both with a handful of steps.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastdiff.models.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="model", required=True)
    shapes = sub.add_parser("tiny-shapes", help="text-to-image latent model on procedural shapes")
    shapes.add_argument("--vae-steps", type=int, default=3000, help="autoencoder training steps (default 3000)")
    shapes.add_argument("--unet-steps", type=int, default=8000, help="UNet + text encoder steps (default 8000)")
    shapes.add_argument("--batch", type=int, default=64, help="UNet batch size; the VAE uses half (default 64)")
    shapes.add_argument(
        "--dataset-size", type=int, default=30000, help="images pre-encoded for the UNet (default 30000)"
    )
    digits = sub.add_parser("digits", help="class-conditional pixel model on scikit-learn's 8x8 digits")
    digits.add_argument("--unet-steps", type=int, default=4000, help="UNet training steps (default 4000)")
    digits.add_argument("--classifier-steps", type=int, default=1500, help="classifier training steps (default 1500)")
    for p in (shapes, digits):
        p.add_argument("--out", required=True, help="directory to write the model into")
        p.add_argument("--seed", type=int, default=0, help="seed for initialisation, data and noise (default 0)")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.model == "tiny-shapes":
        from .training.tiny_shapes import train

        info = train(
            args.out,
            seed=args.seed,
            vae_steps=args.vae_steps,
            unet_steps=args.unet_steps,
            batch=args.batch,
            dataset_size=args.dataset_size,
            show_progress=not args.quiet,
        )
    else:
        from .training.digits import train

        info = train(
            args.out,
            seed=args.seed,
            unet_steps=args.unet_steps,
            classifier_steps=args.classifier_steps,
            show_progress=not args.quiet,
        )
    print(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
