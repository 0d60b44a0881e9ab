"""Train the noise-aware classifier: python train_classifier.py --config configs/digits_classifier.yaml"""
import sys

from guided.cli.train import main_classifier

if __name__ == "__main__":
    sys.exit(main_classifier())
