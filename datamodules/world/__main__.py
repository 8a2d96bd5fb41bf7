"""``python -m datamodules.world --root DIR [...]``: see :mod:`datamodules.world.cli`."""

import sys

from datamodules.world.cli import main

sys.exit(main())
