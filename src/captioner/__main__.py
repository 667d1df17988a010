"""`python -m captioner ...` (and `torchrun -m captioner train ...`) run the command line."""

import sys

from captioner.cli import main

sys.exit(main())
