"""``steerserve train KIND``: artifacts trained offline on the frozen model (CPU is enough).

Kinds: ``controller`` (a refusal controller, ``tools.controller_cli``), ``safeswitch`` (the SafeSwitch probes
and refusal head, ``tools.safeswitch_cli``), ``sae`` (a labelled TopK sparse autoencoder, ``tools.sae_cli``;
the ``train`` extra).
"""

from __future__ import annotations

import argparse

from steerserve.tools.train.controller_cli import add_controller
from steerserve.tools.train.sae_cli import add_sae
from steerserve.tools.train.safeswitch_cli import add_safeswitch


def add_parser(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="train a model-side artifact offline (controller, safeswitch, sae)",
                                description="Train an artifact offline on the frozen model (CPU is enough).")
    kinds = train.add_subparsers(dest="kind", metavar="KIND", required=True)
    add_controller(kinds)
    add_safeswitch(kinds)
    add_sae(kinds)
