"""Train the ADM score model: python train_diffusion.py --config configs/digits.yaml [key=value ...]"""
import sys

from guided.cli.train import main_diffusion

if __name__ == "__main__":
    sys.exit(main_diffusion())
