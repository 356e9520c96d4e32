"""The configuration reference in docs/ is generated from the dataclasses and must match them."""

from pathlib import Path

from voxseq.docs import configuration_reference

ROOT = Path(__file__).resolve().parents[1]


def test_configuration_reference_is_current():
    text = (ROOT / "docs" / "configuration.md").read_text()
    assert text == configuration_reference(), "run: python -m voxseq.docs > docs/configuration.md"
    assert "| `patch_size` | `int` | `16` |" in text and "### `data.preprocess` (Preprocess)" in text
