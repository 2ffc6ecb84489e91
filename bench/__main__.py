"""``python -m slak_triton.bench``: same as the ``slak-bench`` console script."""

import sys

from slak_triton.bench.cli import main

sys.exit(main())
