"""train_diffusion.py / train_classifier.py: train from a YAML config plus dotted overrides.

    python train_diffusion.py --config configs/digits.yaml
    accelerate launch train_diffusion.py --config configs/imagenet64.yaml train.batch_size=32 data.classes=100
    python train_classifier.py --config configs/digits_classifier.yaml --resume

--resume continues from the newest readable checkpoint in train.out_dir; --dry-run
prints the resolved config and exits. Exit status: 0 done, 2 bad input (one
`error:` line), 143 stopped by SIGTERM after saving a checkpoint.
"""
from __future__ import annotations

from pathlib import Path

from ..config import load_config, to_yaml
from ..errors import GuidedError
from . import Parser, run_cli

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
STOPPED = 143  # 128 + SIGTERM


def build_parser(prog: str, default: str) -> Parser:
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help=f"a YAML file from configs/ (default: {default})")
    p.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in train.out_dir")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.batch_size=32")
    return p


def _config(args, default: str):
    path = args.config
    if path is None:
        path = CONFIGS / default
        if not path.is_file():
            raise GuidedError(f"give --config (the default {default} is not in {CONFIGS})")
    return load_config(path, args.overrides)


def _main(kind: str, argv) -> int:
    default = "digits.yaml" if kind == "diffusion" else "digits_classifier.yaml"
    args = build_parser(f"train_{kind}.py", default).parse_args(argv)
    cfg = _config(args, default)
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    if kind == "diffusion":
        from ..train_diffusion_loop import train_diffusion as train
    else:
        from ..train_classifier_loop import train_classifier as train
    return 0 if train(cfg, resume=args.resume).status == "done" else STOPPED


def main_diffusion(argv=None) -> int:
    return run_cli(_main, "diffusion", argv)


def main_classifier(argv=None) -> int:
    return run_cli(_main, "classifier", argv)
