"""Brick metadata from an adapter's model card (pure parsing)."""

from __future__ import annotations

from registry.cli.model_card import card_metadata

CARD = """---
license: apache-2.0
base_model: tiny-llama
tags:
- Sentiment
- text-classification
- has space
library_name: peft
---

# sentiment-lora

<!-- generated -->
Classifies the sentiment of product
reviews as positive or negative.

## Training
...
"""


def test_front_matter_and_first_paragraph() -> None:
    found, notes = card_metadata(CARD)
    assert found == {
        "description": "Classifies the sentiment of product reviews as positive or negative.",
        "tags": ["sentiment", "text-classification"],
        "license": "apache-2.0",
        "base_model": "tiny-llama",
    }
    assert notes == ["README.md: skipped tags that are not valid tags: has space"]


def test_an_explicit_description_wins_and_a_card_without_front_matter_still_describes() -> None:
    found, _ = card_metadata("---\ndescription: Summarize news.\nbase_model: [tiny-llama]\n---\nOther text.\n")
    assert found == {"description": "Summarize news.", "base_model": "tiny-llama"}
    assert card_metadata("# Title\n\nJust a paragraph.\n")[0] == {"description": "Just a paragraph."}
    broken, notes = card_metadata("---\ntags: [unclosed\n---\nBody text.\n")
    assert broken == {"description": "Body text."} and "not valid YAML" in notes[0]


def test_an_unfilled_peft_template_gives_nothing_but_its_tags() -> None:
    template = (
        "---\nbase_model: /models/llama\nlibrary_name: peft\ntags:\n- base_model:adapter:/models/llama\n- lora\n---\n\n"
        "# Model Card for Model ID\n\n<!-- Provide a quick summary. -->\n\n## Model Details\n\n"
        "- **Developed by:** [More Information Needed]\n- **License:** [More Information Needed]\n\n"
        "[More Information Needed]\n"
    )
    found, notes = card_metadata(template)
    assert found == {"tags": ["lora"]}
    assert notes == ["README.md: base_model '/models/llama' is not a registered name; pass --base"]
