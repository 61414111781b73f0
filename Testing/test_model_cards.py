"""Each bundled model's card describes the very file that ships beside it."""
import re

import pytest

from synomaly.files.model_file import BUNDLED_DIR, load_model

CARDS = sorted(BUNDLED_DIR.glob("*.md"))


@pytest.mark.parametrize("card", CARDS, ids=[c.stem for c in CARDS])
def test_card_names_the_bundled_models_id(card):
    """A recalibrated or retrained model gets a new id; a card left at the old one describes another model."""
    weights = card.with_suffix(".safetensors")
    assert weights.exists(), f"{card.name} has no model file beside it"
    title = card.read_text(encoding="utf-8").splitlines()[0]
    named = re.search(r"model id ([0-9a-f]{12})", title)
    assert named, f"{card.name}'s title names no model id: {title!r}"
    assert named.group(1) == load_model(weights).model_id
