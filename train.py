"""Train a CIFAR classifier: `accelerate launch train.py [--config configs/X.yaml] [--flags]`."""
import sys
import time

STARTED = time.time()  # --time-limit-minutes counts from here: the imports below take seconds on a slow CPU

from cifar_tl.cli import main

if __name__ == "__main__":
    sys.exit(main(started=STARTED))
