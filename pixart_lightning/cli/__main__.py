"""``python -m pixart_lightning.cli`` (e.g. under torchrun)."""

import sys

from pixart_lightning.cli import main

sys.exit(main())
