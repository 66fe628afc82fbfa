"""The walkthroughs (docs/derivation.md and its Korean version) and the README's links to them: every
relative link and image resolves, every [`symbol`](file.py) link names something defined in that file, and the
two languages carry the same formulas."""

import ast
import re
from pathlib import Path

import pytest

from project import ROOT

DOCS = [ROOT / "docs" / "derivation.md", ROOT / "docs" / "derivation.ko.md"]
LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")
DISPLAY = re.compile(r"\$\$(.*?)\$\$", re.S)
INLINE = re.compile(r"(?<!\\)\$(.+?)(?<!\\)\$")
GUIDE_TITLE = "Diffusion Model과 DDPM 수식 유도 가이드"
SYMBOL = re.compile(r"^`([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?)`$")


def links(path: Path) -> list[tuple[bool, str, str]]:
    """(is_image, text, target) of every markdown link outside fenced code."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return [(bang == "!", label, target) for bang, label, target in LINK.findall(text)]


def defined_names(py: Path) -> dict[str, set[str]]:
    """Top-level functions, classes and assignments -> {name: names defined in its body (for classes)}."""
    tree = ast.parse(py.read_text(encoding="utf-8"))
    out: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out[node.name] = set()
        elif isinstance(node, ast.ClassDef):
            members = set()
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    members.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    members.add(item.target.id)
                elif isinstance(item, ast.Assign):
                    members |= {t.id for t in item.targets if isinstance(t, ast.Name)}
            out[node.name] = members
        elif isinstance(node, ast.Assign):
            out.update({t.id: set() for t in node.targets if isinstance(t, ast.Name)})
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = set()
    return out


def local(target: str) -> bool:
    return not re.match(r"^[a-z]+:", target) and not target.startswith("#")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_relative_link_and_image_resolves(doc):
    found = [(img, t) for img, _, t in links(doc) if local(t)]
    assert len(found) >= 40, "the walkthrough links its code and figures"
    missing = [t for _, t in found if not (doc.parent / t.split("#")[0]).resolve().exists()]
    assert not missing, missing
    images = {t for img, t in found if img}
    assert {"../reports/figures/noising.png", "../reports/figures/schedules.png", "../reports/figures/loss_weights.png",
            "../reports/figures/denoising.png", "../reports/bpd_per_t.png",
            "../reports/figures/learned_variance.png"} <= images


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_symbol_links_name_a_definition_in_the_linked_file(doc):
    checked, wrong = 0, []
    for _, label, target in links(doc):
        m = SYMBOL.match(label.strip())
        if not (m and target.endswith(".py") and local(target)):
            continue
        if m.group(1) in (Path(target).stem, Path(target).name):  # the module or file itself
            continue
        names = defined_names((doc.parent / target).resolve())
        head, _, member = m.group(1).partition(".")
        ok = head in names and (not member or member in names[head])
        checked += 1
        if not ok:
            wrong.append(f"{m.group(1)} -> {target}")
    assert checked >= 30 and not wrong, wrong


def test_the_two_versions_link_the_same_code_and_figures():
    """The same [`symbol`](file) links and the same images (alt texts are in each document's language)."""
    def targets(doc):
        return {(label if not img else "", t) for img, label, t in links(doc) if local(t) and not t.endswith(".md")}
    en, ko = targets(DOCS[0]), targets(DOCS[1])
    assert en == ko, (en - ko, ko - en)


def normalised(tex: str) -> str:
    """A formula up to spacing, trailing punctuation and the words inside \\text{} (each document's language)."""
    tex = re.sub(r"\\text\{[^}]*\}", r"\\text{}", tex)
    return re.sub(r"\s+", "", tex).rstrip(".,;")


def formulas(doc: Path) -> tuple[list[str], set[str]]:
    """The display formulas ($$...$$) in order, and the set of inline ones ($...$), outside code."""
    text = re.sub(r"```.*?```", "", doc.read_text(encoding="utf-8"), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    display = [normalised(d) for d in DISPLAY.findall(text)]
    inline = {normalised(i) for i in INLINE.findall(DISPLAY.sub(" ", text))}
    return display, inline


def test_the_two_versions_carry_the_same_formulas():
    (en_display, en_inline), (ko_display, ko_inline) = formulas(DOCS[0]), formulas(DOCS[1])
    assert len(en_display) >= 50 and len(en_inline) >= 300, "the extraction finds the formulas"
    assert en_display == ko_display, [(i, e, k) for i, (e, k) in enumerate(zip(en_display, ko_display)) if e != k][:3]
    assert en_inline == ko_inline, (sorted(en_inline - ko_inline), sorted(ko_inline - en_inline))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_the_guide_is_cited_by_its_title_not_as_a_file_of_this_repository(doc):
    text = " ".join(doc.read_text(encoding="utf-8").split())  # the title may wrap
    assert GUIDE_TITLE in text and "guide.ko.md" not in text


def test_readme_links_both_walkthroughs_and_they_resolve():
    readme = ROOT / "README.md"
    found = [t for _, _, t in links(readme) if local(t)]
    assert {"docs/derivation.md", "docs/derivation.ko.md"} <= set(found)
    missing = [t for t in found if not (ROOT / t.split("#")[0]).exists()]
    assert not missing, missing
