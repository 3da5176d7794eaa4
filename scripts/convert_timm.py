"""Converts timm weights into a lambdanet checkpoint that eval-only mode and `init_from` load.

From a checkpoint file (.safetensors needs no torch; .pth needs torch):
  python scripts/convert_timm.py --model lambda_resnet26t --checkpoint model.safetensors \
      --out workdir/timm_lambda_resnet26t
From timm's pretrained weights (downloads them; needs torch and timm):
  python scripts/convert_timm.py --model lambda_resnet50ts --pretrained-live \
      --out workdir/timm_lambda_resnet50ts --verify

Models: resnet50, resnet26t, lambda_resnet26t, lambda_resnet50ts, lambda_resnet26rpt_256
(`lambdanet.convert_timm.ARCHITECTURES`). --timm-name picks a pretrained tag, e.g.
``resnet50.tv_in1k`` for torchvision's weights. --verify runs timm and the converted model on the
same random batch and fails if their logits differ by more than --tolerance (relative to the
largest logit). The checkpoint lands in OUT/checkpoints/0.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np

from lambdanet import convert_timm


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, choices=sorted(convert_timm.ARCHITECTURES))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="timm state_dict: .safetensors, .pth, .pt or .bin")
    source.add_argument(
        "--pretrained-live", action="store_true", help="timm.create_model(..., pretrained=True)"
    )
    parser.add_argument("--timm-name", help="timm model name[.tag] (default: --model)")
    parser.add_argument("--num-classes", type=int, help="default: read from the checkpoint")
    parser.add_argument("--out", required=True, help="output directory (a lambdanet workdir)")
    parser.add_argument("--verify", action="store_true", help="compare logits with timm")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    return parser.parse_args(argv)


def _timm_model(name: str, state_dict: dict | None = None, num_classes: int = 1000):
    """timm's ``name``: pretrained (downloaded) when no ``state_dict`` is given, else loaded."""
    import timm
    import torch

    if state_dict is None:
        return timm.create_model(name, pretrained=True).eval()
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()})
    return model.eval()


def verify(timm_model, model, variables, image_size: int) -> float:
    """Max |logits difference| / max |timm logits| on a random [2, S, S, 3] batch."""
    import torch

    x = np.random.default_rng(0).standard_normal((2, image_size, image_size, 3), np.float32)
    with torch.no_grad():
        expected = timm_model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    logits = np.asarray(jax.jit(model.apply)(variables, x))
    return float(np.abs(logits - expected).max() / np.abs(expected).max())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    timm_name = args.timm_name or args.model
    if args.pretrained_live:
        timm_model = _timm_model(timm_name)
        state_dict, source = timm_model.state_dict(), f"timm:{timm_name} (pretrained)"
    else:
        state_dict = convert_timm.load_state_dict(args.checkpoint)
        source = f"file:{Path(args.checkpoint).name}"
    model, variables = convert_timm.convert_state_dict(args.model, state_dict, args.num_classes)
    if args.verify:
        if not args.pretrained_live:
            timm_model = _timm_model(timm_name, state_dict, model.num_classes)
        image_size = convert_timm.ARCHITECTURES[args.model].image_size
        error = verify(timm_model, model, variables, image_size)
        print(f"max relative logit difference vs timm: {error:.2e}")
        if error > args.tolerance:
            raise SystemExit(f"logits differ from timm's by {error:.2e} > {args.tolerance}")
    directory = convert_timm.save_weights(args.out, variables, model_name=args.model, source=source)
    print(f"wrote {args.model} weights ({source}) to {directory}/{convert_timm.WEIGHTS_STEP}")


if __name__ == "__main__":
    main()
