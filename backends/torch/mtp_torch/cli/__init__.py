"""The ``mtp`` command line: one module per subcommand (``generate``, ``convert``, ``bench``).

``app`` builds the parser and dispatches; ``options`` holds the parsing shared by the subcommands.
"""

from mtp_torch.cli.app import SUBCOMMANDS as SUBCOMMANDS
from mtp_torch.cli.app import build_parser as build_parser
from mtp_torch.cli.app import main as main
from mtp_torch.cli.options import parse_policy as parse_policy

__all__ = ["SUBCOMMANDS", "build_parser", "main", "parse_policy"]
