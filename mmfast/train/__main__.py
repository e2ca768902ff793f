"""`python -m mmfast.train [CONFIG.yaml] [--key value ...]`: the same as `mmfast train` (torchrun-friendly)."""

import sys

from ..cli import train_main

if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
