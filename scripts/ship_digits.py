"""Export the trained digits runs into guided/assets/digits (fp16 weights + their configs).

    python scripts/ship_digits.py [--runs runs]

Each shipped file comes from the run its committed config writes (configs/digits*.yaml, train.out_dir):
EMA weights for score models, the final weights (and calibration) for classifiers. `early.pt` is the
conditional run's EMA snapshot at step 3000 (train.snapshot_steps), the early weak guide.
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "guided" / "assets" / "digits"
SHIPPED = {  # asset name -> (run folder or weights file under --runs, which weights)
    "cond": ("digits", "ema"),
    "early": ("digits/ema_step3000.pt", None),
    "weak": ("digits_weak", "ema"),
    "classifier": ("digits_classifier", "model"),
    "clean_classifier": ("digits_clean_classifier", "model"),
    "ncsn": ("digits_ncsn", "ema"),
    "ncsn_classifier": ("digits_ncsn_classifier", "model"),
}


def main(argv=None) -> int:
    from guided.networks.checkpoints import ship

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=str(ROOT / "runs"))
    args = p.parse_args(argv)
    for name, (src, which) in SHIPPED.items():
        out = ship(Path(args.runs) / src, ASSETS / f"{name}.pt", which=which, dtype="fp16")
        print(f"{out.relative_to(ROOT)}: {out.stat().st_size / 2**20:.1f} MB from {src}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
