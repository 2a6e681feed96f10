"""Shared fixtures: where the real corpora are, and tiny recipes."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


def shared_data_root() -> Path:
    """The real corpora: $SEQ2SEQ_DATA, else ../shared/data beside the checkout.

    Tests that need them fail (never skip) when they are missing: CI has them.
    """
    root = Path(os.environ.get("SEQ2SEQ_DATA") or REPO.parent / "shared" / "data")
    assert (root / "multi30k" / "train.de.gz").is_file(), (
        f"Multi30k not found under {root}; set SEQ2SEQ_DATA to the data root")
    return root


@pytest.fixture
def data_root() -> Path:
    return shared_data_root()
