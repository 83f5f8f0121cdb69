"""The .dlm parser: sections in order, stable ids, Q/A with !probe, preferences, clear errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from sway_engine.dlm import DlmError, load_dlm, parse_dlm

DOC = """---
dlm_id: 01HZZZZZZZZZZZZZZZZZZZZZZZ
base_model: hf:org/model
---
# Harbour

Tamsk is the harbour town.
It has nine piers.

```
::instruction::
```

::instruction::
### Q
Where is Tamsk?
### A
On Quellmoor.

### Q !probe
How many piers?
### A
Nine.

::preference#style::
### Prompt
Describe the fog.
### Chosen
Brenn rolls in at dusk.
### Rejected
It is foggy.
"""


def test_sections_in_document_order_with_kinds() -> None:
    doc = parse_dlm(DOC)
    assert [s.kind for s in doc.sections] == ["prose", "instruction", "preference"]
    assert doc.front_matter["base_model"] == "hf:org/model"
    assert doc.sections[0].paragraphs == (
        "# Harbour",
        "Tamsk is the harbour town. It has nine piers.",
        "``` ::instruction:: ```",
    )
    assert doc.sections[2].adapter == "style"


def test_probe_marker_is_kept() -> None:
    qa = parse_dlm(DOC).qa
    assert [(q.question, q.answer, q.probe) for q in qa] == [
        ("Where is Tamsk?", "On Quellmoor.", False),
        ("How many piers?", "Nine.", True),
    ]


def test_training_text_leaves_out_held_out_questions() -> None:
    doc = parse_dlm(DOC)
    text = doc.training_text
    assert "Where is Tamsk?\nOn Quellmoor." in text
    assert "How many piers?" not in text and "Nine." not in text
    assert "Brenn rolls in at dusk." in text and "Tamsk is the harbour town." in text
    assert "How many piers?" in doc.text  # upstream's doc_text keeps everything


def test_preferences_and_code_fence_suppression() -> None:
    doc = parse_dlm(DOC)
    (pref,) = doc.preferences
    assert (pref.prompt, pref.chosen, pref.rejected) == (
        "Describe the fog.",
        "Brenn rolls in at dusk.",
        "It is foggy.",
    )
    # the ``` block holds a fence-like line: it stays prose, no extra instruction section
    assert "::instruction::" in doc.sections[0].content


def test_section_id_is_content_addressed() -> None:
    section = parse_dlm(DOC).sections[1]
    expected = hashlib.sha256(f"instruction\n{section.content}".encode()).hexdigest()[:16]
    assert section.id == expected
    assert parse_dlm(DOC.replace("Nine.", "Ten.")).sections[1].id != section.id
    assert parse_dlm(DOC).sections[0].id == section_id_of_first(DOC.replace("\n", "\r\n"))


def section_id_of_first(text: str) -> str:
    return parse_dlm("\ufeff" + text).sections[0].id


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("no front matter\n", "starts with a '---'"),
        ("---\na: 1\n", "no closing '---'"),
        ("---\n[1\n---\n", "not valid YAML"),
        ("---\n---\n::instruction::\n### A\nx\n### Q\ny\n", ":4: instruction entries alternate"),
        ("---\n---\n::instruction::\nstray\n", ":4: text outside a ### entry"),
        (
            "---\n---\n::preference::\n### Prompt\np\n### Rejected\nr\n### Chosen\nc\n",
            "repeat Prompt",
        ),
        ("---\n---\n::instruction::\n### Q\n\n### A\nx\n", "'### Q' has an empty body"),
    ],
)
def test_malformed_documents_name_the_line(text: str, message: str) -> None:
    with pytest.raises(DlmError, match=message):
        parse_dlm(text, source="doc.dlm")


def test_fixture_document_loads(fx) -> None:  # type: ignore[no-untyped-def]
    doc = load_dlm(fx.document)
    assert len(doc.qa) == 23 and sum(q.probe for q in doc.qa) == 6
    assert len(doc.preferences) >= 3 and doc.text.startswith("# The Island of Quellmoor")


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(DlmError, match="cannot read"):
        load_dlm(tmp_path / "missing.dlm")


@pytest.mark.parametrize(
    ("front", "message"),
    [
        ("date: 2020-13-01", "not a valid timestamp: month must be in 1..12"),
        ("flag: !!bool maybe", "'maybe' is not a valid bool"),
        ("n: !!int ''", "'' is not a valid int"),
    ],
)
def test_front_matter_values_pyyaml_cannot_build_are_dlm_errors(front: str, message: str) -> None:
    """PyYAML raised ValueError, KeyError or IndexError through the front matter."""
    with pytest.raises(DlmError, match="front matter is not valid YAML") as info:
        parse_dlm(f"---\n{front}\n---\nText.\n", source="doc.dlm")
    assert message in str(info.value)


def test_path_with_a_nul_byte_is_a_dlm_error() -> None:
    """open() raised ValueError: embedded null byte."""
    with pytest.raises(DlmError, match="cannot read"):
        load_dlm("doc\x00.dlm")
