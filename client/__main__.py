"""``python -m inflight.client``: see ``inflight.client.cli``."""

import sys

from .cli import main

sys.exit(main())
