"""`python -m training` / `torchrun -m training`: the same as `kiln train`."""

import sys

from training.train import main

if __name__ == "__main__":
    sys.exit(main())
