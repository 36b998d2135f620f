"""``python -m mtp_torch.cli`` runs the ``mtp`` command line."""

import sys

from mtp_torch.cli.app import main

sys.exit(main())
