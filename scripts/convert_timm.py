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

import argparse

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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        directory, difference = convert_timm.convert_checkpoint(
            args.model,
            args.out,
            checkpoint_file=args.checkpoint,
            timm_name=args.timm_name,
            num_classes=args.num_classes,
            tolerance=args.tolerance if args.verify else None,
        )
    except ValueError as error:
        raise SystemExit(str(error)) from error
    if difference is not None:
        print(f"max relative logit difference vs timm: {difference:.2e}")
    print(f"wrote {args.model} weights to {directory}/{convert_timm.WEIGHTS_STEP}")


if __name__ == "__main__":
    main()
