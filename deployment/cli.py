"""The installed `mergerec` command: the model and data commands of common/api/cli.py plus the launchers.

    mergerec simulate  [--data-root DIR --domains a,b,c --run-config "k=v ..."]
    mergerec certs --out certs --domains a,b,c

`mergerec --help` lists every command.
"""

from __future__ import annotations

import sys

from common.api import cli


def launch_commands() -> dict:
    """command -> (main(argv, prog), one-line help) of the launchers (they parse their own options)."""
    from deployment import certs, simulate

    return {"simulate": (simulate.main, "run the whole federated pipeline in a local Flower simulation"),
            "certs": (certs.main, "TLS certificates and SuperNode keys for a deployment")}


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, extra=launch_commands())


if __name__ == "__main__":
    sys.exit(main())
