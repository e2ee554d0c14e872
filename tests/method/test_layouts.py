"""Prompt layouts (`annotator.method.layouts`): the published one (system = the pack's method, user = the document and the task)
and the shared one (a system block the built-in packs hold word for word, the document as its own
turn, the pack's task last); how a run picks each recipe's layout; broken shared forms refused at
load, naming the file; and, on the generator's own tokenizer, that a document's recipes send the
same token ids up to their task (pause readers) or up to the pause (the whole-content readers), so
the engine's prefix cache can hold the document once. The engine's cache hits per recipe are
asserted on a real engine in tests/run/test_add_recipe.py."""

from __future__ import annotations

import shutil
import textwrap

import pytest

from annotator.config import GenerationConfig
from annotator.engine.models import resolve_model
from annotator.engine.prompt_ids import PromptBuilder
from annotator.generate.pause import pause_point
from annotator.method.layouts import in_layout
from annotator.method.prompt_packs import Canary, PackError, load_pack, resolve_pack_path
from annotator.method.recipes import run_recipes
from annotator.method.resolved import resolve_run
from tests.support import read_input

SHARED_PACKS = ["reflection-v2", "refusal-reflection-v1", "preflection-v1", "summary-v1", "annotations-v1"]
# <|im_end|>\n<|im_start|>user\n before the task, <|im_end|>\n<|im_start|>assistant\n after it: 11 ids in SmolLM2.
TEMPLATE_AROUND_TASK = 11
TASKS = ("reflection", "refusal_reflection", "preflection", "summary", "annotations")


def test_the_built_in_packs_share_one_system_block_and_one_document_turn():
    packs = [in_layout(load_pack(name), "shared") for name in SHARED_PACKS]
    assert [p.layout for p in packs] == ["shared"] * 5
    assert len({p.system_prompt() for p in packs}) == 1
    system = packs[0].system_prompt()
    assert all(f"## Task: {t}\n" in system for t in TASKS)
    assert "### 2.3 " in system and "## Writing style" in system and "{" + "charter}" not in system
    page = "Bread, knives and a >>> sign."
    turns = [p.messages(page, keys=["topic", "style"]) for p in packs]
    assert all([m["role"] for m in t] == ["system", "user", "user"] for t in turns)
    assert {t[1]["content"] for t in turns} == {"Here is the text:\n\n<<<\nBread, knives and a >\u2060>> sign.\n>>>"}
    tasks = [t[2]["content"] for t in turns]
    assert [task.split(".")[0] for task in tasks] == [f"Task: {t}" for t in TASKS]
    assert "Keys: topic, style." in tasks[4] and page not in "".join(tasks)


def test_a_canary_goes_in_the_task_turn_and_the_document_turn_stays_shared():
    reflection, summary = (in_layout(load_pack(n), "shared") for n in ("reflection-v2", "summary-v1"))
    canary = Canary(id="wren", value="a wren", instruction="mention a wren", instruction_3p="mention the wren")
    with_canary = reflection.messages("A page.", canary)
    assert with_canary[:2] == summary.messages("A page.")[:2]
    assert "- in reflection_1p: mention a wren\n- in reflection_3p: mention the wren" in with_canary[2]["content"]


def test_layout_choice_versions_and_the_published_form():
    pack = load_pack("reflection-v2")
    assert pack.layout == "published" and [m["role"] for m in pack.messages("A page.")] == ["system", "user"]
    shared = in_layout(pack, "shared")
    assert shared.version.startswith("reflection-v2@") and shared.version.endswith("+shared") and shared.version != pack.version
    assert in_layout(shared, "published").version == pack.version
    assert in_layout(pack, "auto").layout == pack.default_layout
    assert in_layout(pack, "published").system_prompt() == pack.system_prompt() != shared.system_prompt()
    # A pack without a shared form (the first reflection pack, rephrase) stays published.
    assert in_layout(load_pack("reflection-v1"), "shared").layout == "published"
    assert in_layout(load_pack("rephrase-v1"), "shared").version == load_pack("rephrase-v1").version
    with pytest.raises(PackError, match="prompt layout must be auto or one of"):
        in_layout(pack, "sideways")


def test_a_run_lays_out_each_recipe_as_its_config_says():
    six = ["reflection", "reflection_end", "refusal_reflection", "preflection", "summary", "annotations", "rephrase"]
    for choice in ("published", "shared"):
        packs = resolve_run(GenerationConfig(recipes=six, prompt_layout=choice), voices=["1p"]).packs
        want = {name: "published" if name == "rephrase" or choice == "published" else "shared" for name in six}
        assert {name: p.layout for name, p in packs.items()} == want
        assert all(p.version.endswith("+shared") == (want[n] == "shared") for n, p in packs.items())
    auto = run_recipes(GenerationConfig(recipes=["reflection", "summary"]))
    assert [r.load_pack().layout for r in auto] == [load_pack(r.pack).default_layout for r in auto]


def _pack_file(tmp_path, *, layout: str | None, shared: str) -> str:
    src = resolve_pack_path("reflection-v2")
    for name in ("system.md", "user.md", "canary.md", "constitution.md", "writing_guidelines.md", "task.md"):
        shutil.copy(src / name, tmp_path / name)
    shutil.copytree(src.parent / "shared-v1", tmp_path / "shared-v1", dirs_exist_ok=True)
    (tmp_path / "mine.yaml").write_text(textwrap.dedent("""\
        name: mine
        constitution: constitution.md
        system: system.md
        user: user.md
        canary: canary.md
        files: {writing_guidelines: writing_guidelines.md}
        fields: [analysis, reflection_1p, reflection_3p]
        voices: {reflection_1p: 1p, reflection_3p: 3p}
        """) + (f"prompt_layout: {layout}\n" if layout else "") + shared)
    load_pack.cache_clear()
    return str(tmp_path / "mine.yaml")


FORM = "shared:\n  system: shared-v1/system.md\n  document: shared-v1/document.md\n  task: task.md\n"


def test_a_pack_given_by_path_is_published_unless_it_opts_in(tmp_path):
    plain = load_pack(_pack_file(tmp_path, layout=None, shared=""))
    with_form = load_pack(_pack_file(tmp_path, layout=None, shared=FORM))
    assert in_layout(with_form, "auto").layout == "published" and in_layout(plain, "shared").layout == "published"
    # Adding a shared form leaves the published version as it was (a run in progress resumes).
    assert with_form.version == plain.version
    opted = load_pack(_pack_file(tmp_path, layout="shared", shared=FORM))
    assert in_layout(opted, "auto").layout == "shared"
    assert in_layout(opted, "auto").system_prompt() == in_layout(load_pack("reflection-v2"), "shared").system_prompt()


@pytest.mark.parametrize("layout, shared, message", [
    ("shared", "", "shared needs a 'shared:' form"),
    ("sideways", FORM, "prompt_layout must be one of"),
    (None, FORM.replace("task.md", "missing.md"), "shared.task file"),
    (None, FORM + "  extra: x.md\n", "shared must map system, document, task"),
    (None, FORM.replace("document: shared-v1/document.md", "document: {text: 'no placeholder'}"), "must contain {text} exactly once"),
    (None, FORM.replace("task: task.md", "task: {text: 'Task {text}'}"), "shared.task: unknown placeholder {text}"),
    (None, FORM.replace("system: shared-v1/system.md", "system: {text: '{charter} {writing_guidelines} {canary}'}"),
     "shared.system: {canary} belongs in the user template"),
    (None, FORM.replace("task: task.md", "task: {text: 'Task.'}"), "missing placeholder {canary}"),
    (None, FORM + "  files: {extra: task.md}\n", "['extra'] named but no shared template uses them"),
])
def test_a_broken_shared_form_is_refused_naming_the_file(tmp_path, layout, shared, message):
    spec = _pack_file(tmp_path, layout=layout, shared=shared)
    with pytest.raises(PackError, match="mine.yaml") as err:  # its shape at load, its files when the shared layout is asked for
        in_layout(load_pack(spec), "shared")
    assert message in str(err.value)


def test_a_built_in_pack_copied_alone_still_loads_and_runs_published(tmp_path):
    copy = shutil.copytree(resolve_pack_path("summary-v1"), tmp_path / "my-summary")
    load_pack.cache_clear()
    pack = load_pack(str(copy))
    assert pack.version == load_pack("summary-v1").version and in_layout(pack, "published").messages("A page.")[0]["role"] == "system"
    with pytest.raises(PackError, match=r"my-summary/pack.yaml: shared.files.charter file .*reflection-v2/constitution.md' does not exist"):
        in_layout(pack, "shared")


@pytest.fixture(scope="module")
def builder():
    from transformers import AutoTokenizer

    return PromptBuilder(AutoTokenizer.from_pretrained(resolve_model("builtin:smollm2-135m-instruct")))


def _common(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_a_documents_recipes_send_the_same_ids_up_to_their_task_or_the_pause(builder):
    from annotator.core.tokens import target_tokenizer

    tok = target_tokenizer("builtin:smollm2-135m-instruct")
    pages = [t for t in list(read_input().values())[:60] if 800 < len(t) < 6000][:8]
    reflection, refusal, summary = (in_layout(load_pack(n), "shared") for n in ("reflection-v2", "refusal-reflection-v1", "summary-v1"))
    for page in pages:
        offsets = tok.offsets(page)
        pause = pause_point(page, offsets, fraction=0.5, max_prefix_tokens=4000, max_content_tokens=1920)
        end = pause_point(page, offsets, fraction=1.0, max_prefix_tokens=4000, max_content_tokens=1920, at_end=True)
        ids = {name: builder.ids(pack.messages(text)) for name, pack, text in
               (("reflection", reflection, pause.prompt_prefix), ("refusal", refusal, pause.prompt_prefix),
                ("summary", summary, end.prompt_prefix))}
        # Everything before the task turn is shared: the ids differ only in the task's own tokens
        # and the few template tokens around it (turn end, next turn's role, generation prompt).
        task = len(builder.content_ids(reflection.messages(pause.prompt_prefix)[2]["content"])) + TEMPLATE_AROUND_TASK
        assert _common(ids["reflection"], ids["refusal"]) >= len(ids["reflection"]) - task
        # The whole-content reader's ids equal the pause readers' up to the pause point (the pause
        # sits at a word start, where the tokenizer splits anyway); then its text goes on.
        until_pause = len(ids["reflection"]) - task - len(builder.content_ids("\n>>>"))
        assert _common(ids["reflection"], ids["summary"]) >= until_pause
        assert len(ids["summary"]) > until_pause + 16 and len(ids["reflection"]) > 3500 + len(tok.offsets(pause.prompt_prefix))
