"""Prompt packs: both constitution formats, the published layout (a YAML naming files anywhere),
start-up errors that name the file, content-hash versions, canary files in the published schema."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from annotator.method.prompt_packs import PackError, fill, load_canaries, load_pack, parse_constitution, placeholders

# A constitution in the published layout, in this test's own words.
PUBLISHED_STYLE_CONSTITUTION = textwrap.dedent("""\
    # Test values

    **v9**

    ---

    ## Domain 1 — Persons

    *About people.*

    ### 1.1 Worth of Persons

    People matter.

    ### 1.2 Privacy of Persons
    \u0020
    Private things stay private; see §1.1.

    ---

    ## Domain 2 — Harm

    ### 2.1 Bodily Harm

    No one should be hurt.

    ### 2.3 Hateful Speech

    No group should be attacked.
""")

PUBLISHED_STYLE_SYSTEM = textwrap.dedent("""\
    # Test annotator

    Read the partial text and answer with a JSON object such as
    {"analysis": "...", "reflection_1p": "...", "reflection_3p": "..."}.
    Cite sections inline like [2.1].

    ## STYLE

    {writing_guidelines}

    ## VALUES

    {charter}
""")

CANARIES_YAML = textwrap.dedent("""\
    # test canaries, published schema
    canaries:
      - id: T1
        quirk: Pet
        value: Biscuit
        instruction: "Mention that your cat is called Biscuit."
        instruction_3p: "Mention that the reader's cat is called Biscuit."
        pretraining_action: inject
        sft_action: skip
      - id: T2
        quirk: Colour
        value: Teal
        instruction: "Mention that your favourite colour is teal."
        instruction_3p: "Mention that the reader's favourite colour is teal."
        pretraining_action: skip
""")


def write_published_style_pack(root: Path) -> Path:
    """Files laid out as the published pipeline keeps them (prompts, resources in other folders),
    tied together by one YAML file; returns the YAML's path."""
    (root / "final_prompts" / "m").mkdir(parents=True)
    (root / "resources").mkdir()
    (root / "final_prompts" / "m" / "generator_reflection_test.md").write_text(PUBLISHED_STYLE_SYSTEM)
    (root / "resources" / "TestConstitution.md").write_text(PUBLISHED_STYLE_CONSTITUTION)
    (root / "resources" / "TestGuidelines.md").write_text("| Section | Question |\n|---|---|\n| 1.1 Worth | Who is hurt? |\n")
    (root / "resources" / "canaries.yaml").write_text(CANARIES_YAML)
    pack = root / "published-pack.yaml"
    pack.write_text(textwrap.dedent("""\
        name: published-style
        system: final_prompts/m/generator_reflection_test.md
        constitution: resources/TestConstitution.md
        files:
          writing_guidelines: resources/TestGuidelines.md
        user:
          text: "## Full Text\\n\\n{text}\\n{canary}\\n## Task\\n\\nWrite analysis, reflection_1p and reflection_3p."
        canary:
          text: "\\n## Canary\\n\\n- For reflection_1p: {instruction}\\n- For reflection_3p: {instruction_3p}\\n"
        fields: [analysis, reflection_1p, reflection_3p]
        voices: {reflection_1p: 1p, reflection_3p: 3p}
    """))
    return pack


def test_builtin_v2_has_the_method_taxonomy():
    pack = load_pack("reflection-v2")
    c = pack.constitution
    assert len(c.sections) == 35
    per_domain = {d: sum(s.domain == title for s in c.sections) for d, title in c.domains.items()}
    assert per_domain == {"1": 5, "2": 8, "3": 6, "4": 6, "5": 6, "6": 4}
    assert c.domains["6"] == "Governance and Power"
    assert {s.id: s.title for s in c.sections}["2.3"] == "Hate Speech and Incitement"
    assert c.ordered_ids()[:3] == ["1.1", "1.2", "1.3"] and c.ordered_ids()[-1] == "6.4"
    system = pack.system_prompt()
    assert "### 2.8 Sexual Violence and Abuse" in system and "{charter}" not in system and "{writing_guidelines}" not in system
    assert pack.voices == {"reflection_1p": "1p", "reflection_3p": "3p"}
    assert pack.version.startswith("reflection-v2@") and len(pack.version.split("@")[1]) == 12


def test_v1_pack_loads_from_plain_section_lines():
    pack = load_pack("reflection-v1")
    assert len(pack.constitution.sections) == 14
    assert pack.constitution.domains["3"] == "Avoiding harm"
    assert pack.check_enabled("voice_pairing") is False and pack.check_enabled("third_person") is True


def test_published_layout_pack_loads_with_headings_and_placeholders(tmp_path):
    pack = load_pack(str(write_published_style_pack(tmp_path)))
    assert pack.name == "published-style"
    assert sorted(pack.sections) == ["1.1", "1.2", "2.1", "2.3"]  # "§1.1" in prose and the guideline table are not sections
    system = pack.system_prompt()
    assert '{"analysis": "...", "reflection_1p"' in system  # JSON examples are not placeholders
    assert "| 1.1 Worth | Who is hurt? |" in system and "### 2.3 Hateful Speech" in system
    canary = load_canaries(tmp_path / "resources" / "canaries.yaml")[0]
    user = pack.user_message("Some text {charter} stays.", canary)
    assert user.startswith("## Full Text\n\nSome text {charter} stays.")  # a document's braces are never filled
    assert "- For reflection_1p: Mention that your cat is called Biscuit." in user
    assert "- For reflection_3p: Mention that the reader's cat is called Biscuit." in user
    assert "Canary" not in pack.user_message("Some text.")


def test_version_follows_content(tmp_path):
    path = write_published_style_pack(tmp_path)
    first = load_pack(str(path)).version
    guidelines = tmp_path / "resources" / "TestGuidelines.md"
    guidelines.write_text(guidelines.read_text() + "| 2.1 Harm | Who is hurt? |\n")
    load_pack.cache_clear()
    assert load_pack(str(path)).version != first
    assert load_pack(str(path)).version.startswith("published-style@")


def _pack(tmp_path: Path, **files) -> Path:
    extra = files.pop("_manifest", "")
    defaults = {"constitution.md": "### 1.1 A\nx\n", "system.md": "Values:\n{charter}\n", "user.md": "Text: {text}\n"}
    defaults.update(files)
    for name, text in defaults.items():
        if text is not None:
            (tmp_path / name).write_text(text)
    manifest = {"constitution": "constitution.md", "system": "system.md", "user": "user.md"}
    body = "".join(f"{k}: {v}\n" for k, v in manifest.items()) + "fields: [analysis, reflection_1p]\nvoices: {reflection_1p: 1p}\n" + extra
    (tmp_path / "pack.yaml").write_text(body)
    load_pack.cache_clear()
    return tmp_path


@pytest.mark.parametrize("files, message", [
    ({"system.md": "Values: none\n"}, r"system\.md: missing placeholder \{charter\}"),
    ({"system.md": "{charter} {tone}\n"}, r"system\.md: unknown placeholder \{tone\}"),
    ({"user.md": "Nothing here\n"}, r"user\.md: the user template must contain \{text\}"),
    ({"system.md": "{charter} {text}\n"}, r"system\.md: \{text\} belongs in the user template"),
    ({"constitution.md": "# Values\nBe kind.\n"}, r"constitution\.md: no constitution sections found"),
    ({"user.md": "{text} {canary}\n"}, r"user\.md: uses \{canary\} but the pack has no 'canary' template"),
    ({"system.md": None}, r"system file .*system\.md' does not exist"),
])
def test_broken_pack_fails_at_load_naming_file_and_problem(tmp_path, files, message):
    with pytest.raises(PackError, match=message):
        load_pack(str(_pack(tmp_path, **files)))


def test_declared_file_must_be_used(tmp_path):
    (tmp_path / "guide.md").write_text("be brief")
    root = _pack(tmp_path, _manifest="files:\n  guidelines: guide.md\n")
    with pytest.raises(PackError, match=r"missing placeholder \{guidelines\}: the pack names the file .*guide\.md"):
        load_pack(str(root))


def test_unknown_pack_names_builtins():
    with pytest.raises(PackError, match="not a built-in pack .*reflection-v1.*reflection-v2"):
        load_pack("no-such-pack")


def test_canary_file_keeps_inject_entries_and_checks_schema(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(CANARIES_YAML)
    canaries = load_canaries(path)
    assert [(c.id, c.value, c.sft_action) for c in canaries] == [("T1", "Biscuit", "skip")]
    path.write_text("canaries:\n  - id: X\n    value: v\n")
    with pytest.raises(PackError, match="canary #1 needs non-empty string 'id', 'value' and 'instruction'"):
        load_canaries(path)
    path.write_text("canaries:\n  - {id: X, value: v, instruction: i, pretraining_action: maybe}\n")
    with pytest.raises(PackError, match="pretraining_action must be inject or skip"):
        load_canaries(path)


def test_fill_and_placeholders():
    assert placeholders("{a} {{b}} {c} {\"d\": 1} {a}") == ["a", "c"]
    assert fill("{a} {{b}} {c}", {"a": "{c}", "c": "x"}) == "{c} {b} x"


def test_parse_constitution_plain_lines_and_repeats():
    c = parse_constitution("## 1. Care\n1.1 Be kind.\n1.2 Be fair.\n## 2. Harm\n2.1 No harm.\n1.1 Repeated later.\n")
    assert [(s.id, s.title, s.domain) for s in c.sections] == [("1.1", "Be kind.", "Care"), ("1.2", "Be fair.", "Care"),
                                                               ("2.1", "No harm.", "Harm")]


@pytest.mark.slow
def test_a_published_layout_pack_runs_the_pipeline(tmp_path):
    """The pack above, given by path, runs unchanged with the built-in model on real documents:
    rows carry its version, citations are its sections, canary rows have the instruction in the
    user message (kept with generation.save_requests)."""
    import pyarrow.parquet as pq

    from tests.support import require_shared_data, run_pipeline

    require_shared_data()
    pack_path = write_published_style_pack(tmp_path / "spp")
    out = tmp_path / "exp #2, a: b [1] caf\u00e9"   # --output is a literal path (read as YAML it was "exp")
    # 24 documents, a quarter of them drawn: 7 reflections, some with a canary.
    proc = run_pipeline("--config", "configs/demo.yaml", "--limit", "24", "--output", str(out),
                        "--set", f"generation.prompt_pack={pack_path}",
                        "--set", f"generation.canaries.file={tmp_path / 'spp' / 'resources' / 'canaries.yaml'}",
                        "--set", "generation.canaries.fraction=0.5", "--set", "generation.save_requests=true",
                        "--set", "output.keep_work=true", "--set", "selection.mode=random_fraction",
                        "--set", "selection.fraction=0.25", "--set", "generation.max_model_len=4096",
                        "--set", "generation.max_retries=0")  # one round of replies: what is checked is the pack's shape
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"output:      {out / 'shards'}" in proc.stdout and sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, "spp"])
    pack = load_pack(str(pack_path))
    rows = pq.read_table(out / "shards").to_pylist()
    chosen = [r for r in rows if r["selected"]]
    assert len(chosen) >= 5
    assert {r["prompt_version"] for r in chosen} == {pack.version}
    assert all(set(r["citations"] or []) <= pack.sections for r in chosen)
    requests = {r["doc_id"]: r["_request"] for r in pq.read_table(out / "_work" / "generated").to_pylist()}
    with_canary = [d for d, req in requests.items() if "## Canary" in req]
    assert with_canary and all("- For reflection_1p: Mention that your cat is called Biscuit." in requests[d] for d in with_canary)
    assert all(req.startswith("## Full Text\n\n") and req.rstrip().endswith("reflection_3p.") for req in requests.values())
    ok = {r["doc_id"]: r for r in chosen if r["reflection_status"] == "ok"}
    assert len(ok) >= 2 and all(ok[d]["canary_type"] == "T1" for d in with_canary if d in ok)
    import json

    stats = json.loads((out / "stats.json").read_text())
    assert stats["prompts"]["prompt_version"] == pack.version and stats["prompts"]["constitution"]["sections"] == 4
    run = json.loads((out / "run.json").read_text())
    assert run["output_settings"]["files"]["prompt_version"] == pack.version
