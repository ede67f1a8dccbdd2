"""Train a CIFAR classifier: `accelerate launch train.py [--config configs/X.yaml] [--flags]`."""
import sys

from cifar_tl.cli import main

if __name__ == "__main__":
    sys.exit(main())
