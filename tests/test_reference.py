"""The committed config reference and JSON schema are the ones the code generates."""

from __future__ import annotations

import json
from pathlib import Path

from modelgate.reference import reference_markdown, schema_json

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_reference_is_up_to_date() -> None:
    committed = (CONFIGS / "REFERENCE.md").read_text(encoding="utf-8")
    assert committed == reference_markdown(), (
        "run: python -m modelgate.reference > configs/REFERENCE.md"
    )


def test_schema_is_up_to_date() -> None:
    committed = json.loads((CONFIGS / "modelgate.schema.json").read_text(encoding="utf-8"))
    assert committed == json.loads(schema_json())


def test_every_key_of_the_example_is_in_the_reference() -> None:
    reference = reference_markdown()
    for key in (
        "listen",
        "limits.max_body_bytes",
        "routes[].experiment.canary.steps",
        "routes[].shadows[].compare.fields",
        "routes[].chaos[].delay.max_ms",
    ):
        assert f"`{key}`" in reference, key
