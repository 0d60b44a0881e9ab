"""train_diffusion.py / train_classifier.py: train from a YAML config plus dotted overrides.

    python train_diffusion.py --config configs/digits.yaml
    accelerate launch train_diffusion.py --config imagenet64.yaml train.batch_size=32 data.classes=100
    python train_classifier.py --config digits_classifier.yaml --resume

--config takes a path or the name of a shipped config (digits.yaml, imagenet64, ...; they are
installed with the package). --resume continues from the newest readable checkpoint in
train.out_dir; --dry-run prints the resolved config and exits. Exit status: 0 done, 2 bad
input (one `error:` line), 143 / 130 stopped by SIGTERM / Ctrl-C after saving a checkpoint.
"""
from __future__ import annotations


from guided.cli import Parser, run_cli
from guided.config import load_config, to_yaml
from guided.signals import exit_status


WHERE = """where it writes: train.out_dir (default runs/default; the shipped configs set their own) gets
  config.yaml and label_map.json at the start, metrics.jsonl every train.log_every steps, and every
  train.save_every steps a full checkpoint ckpt-<step>.pt (the newest train.keep_checkpoints kept) with
  weights-only model.pt for sampling, and ema.pt where train.ema_rates is set (the diffusion configs; the
  classifier configs keep no EMA); TensorBoard curves under train.out_dir/tb.
  A folder with checkpoints is refused without --resume; one run at a time holds train.out_dir/.lock."""


def build_parser(prog: str, default: str) -> Parser:
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0], epilog=WHERE)
    p.add_argument("--config", default=default, help="a YAML file, or the name of a shipped config")
    p.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in train.out_dir")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. train.batch_size=32 train.out_dir=runs/mine train.save_every=500")
    return p


def _main(kind: str, argv) -> int:
    default = "digits.yaml" if kind == "diffusion" else "digits_classifier.yaml"
    args = build_parser(f"train_{kind}.py", default).parse_intermixed_args(argv)  # overrides and options in any order
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    if kind == "diffusion":
        from guided.training.diffusion import train_diffusion as train
    else:
        from guided.training.classifier import train_classifier as train
    result = train(cfg, resume=args.resume)
    return 0 if result.status == "done" else exit_status(result.stopped_by)


def main_diffusion(argv=None) -> int:
    return run_cli(_main, "diffusion", argv)


def main_classifier(argv=None) -> int:
    return run_cli(_main, "classifier", argv)
