"""The README and docs/ stay true to the tree: a short front page, links that resolve, module commands that exist,
the alias table of the engine, and the image tolerance the tests really check."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
MAX_README_LINES = 200


def without_fences(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def prose(text: str) -> str:
    """Markdown without its fenced code blocks and inline code spans (where `[x](y)` is code, not a link)."""
    return re.sub(r"`[^`\n]*`", "", without_fences(text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", without_fences(page.read_text()), flags=re.M)}


def broken_links(page: Path) -> list[str]:
    """Relative links and images of `page` whose file (or heading anchor) does not exist."""
    broken = []
    for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", prose(page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(target)
    return broken


def module_commands(text: str) -> list[tuple[str, str]]:
    """(module, the word after it) of every `python -m visualizer...` in `text`."""
    return re.findall(r"python -m (visualizer(?:\.\w+)*)[ \t]*([\w-]*)", text)


def runnable(module: str) -> bool:
    """`python -m module` has a file to run: module.py, or a package with a __main__.py (checked without importing)."""
    path = ROOT.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__main__.py").is_file()


def cli_subcommands() -> set[str]:
    return set(re.findall(r"add_parser\(\"([\w-]+)\"", (ROOT / "visualizer" / "cli.py").read_text()))


def alias_tables(text: str) -> list[list[dict[str, str]]]:
    """Markdown tables whose header has an "alias" or "aliases" column, as rows of {column: cell}."""
    tables, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip().lower() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and ({"alias", "aliases"} & set(cells)) and i + 1 < len(lines) \
                and set(lines[i + 1].replace("|", "").strip()) <= {"-", ":", " "}:
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append(dict(zip(cells, (c.strip() for c in row.strip().strip("|").split("|")))))
            tables.append(rows)
    return tables


def table_aliases(rows: list[dict[str, str]]) -> list[str]:
    column = "alias" if "alias" in rows[0] else "aliases"
    return [name for row in rows for name in re.findall(r"`([^`]+)`", row[column])]


TOLERANCE_FILES = ["conftest.py", "test_denoise.py", "test_img2img.py", "test_sdxl.py", "test_sd3.py", "test_flux.py"]


def tolerances_in(texts: list[str]) -> set[float]:
    """The image tolerances (in levels of 255) the tests' comparisons with diffusers check: `<= N / 255`, or a
    shared `IMAGE_TOLERANCE = N / 255`."""
    pattern = r"(?:IMAGE_TOLERANCE\s*(?::\s*float\s*)?=|<=)\s*(\d+(?:\.\d+)?)\s*/\s*255\b"
    return {float(n) for text in texts for n in re.findall(pattern, text)}


def stated_tolerance(readme: str) -> float:
    found = re.findall(r"largest difference of \*\*(\d+(?:\.\d+)?)/255\*\*", readme)
    assert len(found) == 1, "the README states the tests' image tolerance once, as **N/255**"
    return float(found[0])


# --- the checks on the real README and docs


def test_the_readme_is_a_front_page():
    lines = README.read_text().count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move detail into docs/"


def test_the_docs_exist_and_the_readme_links_each():
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)", README.read_text()))
    assert DOCS and {f"docs/{p.name}" for p in DOCS} <= linked


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_points_at_a_file_that_exists(page):
    assert broken_links(page) == []


def test_the_links_are_found_at_all():
    text = prose(README.read_text())
    assert "assets/player.png" in text and "assets/denoising-demo.gif" in text and "docs/models.md" in text


def test_every_module_command_names_a_module_of_the_tree():
    found = [(page.name, m, word) for page in PAGES for m, word in module_commands(page.read_text())]
    assert {"visualizer", "visualizer.toy.train", "visualizer.analysis.image_map", "visualizer.bench.load"} <= \
        {m for _, m, _ in found}
    assert [f"{page}: python -m {m}" for page, m, _ in found if not runnable(m)] == []


def test_every_cli_subcommand_in_the_docs_exists():
    subcommands = cli_subcommands()
    assert {"run", "compare", "toy", "samplers", "export", "bench"} <= subcommands
    used = [(page.name, word) for page in PAGES for m, word in module_commands(page.read_text()) if m == "visualizer"]
    assert used and [f"{page}: python -m visualizer {w}" for page, w in used if w and w not in subcommands] == []


@pytest.mark.parametrize("page", [README, ROOT / "docs" / "models.md"], ids=lambda p: p.name)
def test_the_alias_tables_list_exactly_the_engines_aliases(page):
    from visualizer.engine.models import ALIASES, family_of_reference

    tables = alias_tables(page.read_text())
    assert tables, f"{page.name} has no table with an alias column"
    for rows in tables:
        names = table_aliases(rows)
        assert sorted(names) == sorted(ALIASES), f"{page.name}: {names} against the engine's {list(ALIASES)}"
        for row in rows:
            name = re.findall(r"`([^`]+)`", row.get("alias", row.get("aliases", "")))[0]
            if "hub id" in row:
                assert row["hub id"].strip("`") == ALIASES[name], name
            if "family" in row:
                assert row["family"] == family_of_reference(name).name, name


def test_the_stated_tolerance_is_what_the_tests_check():
    """The README states the loosest tolerance any of the comparisons with diffusers allows."""
    texts = [(ROOT / "tests" / name).read_text() for name in TOLERANCE_FILES]
    tested, stated = tolerances_in(texts), stated_tolerance(README.read_text())
    assert tested, "found no image tolerance in the tests: update tolerances_in"
    assert max(tested) == stated, (f"README.md states {stated:g}/255 but the tests check "
                                   f"{', '.join(f'{t:g}/255' for t in sorted(tested))}: update the README's "
                                   "'How close to diffusers' paragraph")


# --- the checks can fail


def test_a_broken_link_and_a_missing_anchor_are_found(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A section: here\n\n## `--dtype` and `--offload`\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md) [ok](other.md#a-section-here) [ok](other.md#--dtype-and---offload) "
                    "[web](https://example.com) `[code](nowhere.md)`\n"
                    "![gone](missing.png) [gone](other.md#no-such-heading) [gone](#nor-here)\n")
    assert broken_links(page) == ["missing.png", "other.md#no-such-heading", "#nor-here"]


def test_a_module_command_without_a_module_is_found():
    assert runnable("visualizer") and runnable("visualizer.toy.train") and runnable("visualizer.bench.load")
    assert not runnable("visualizer.toy_train") and not runnable("visualizer.loadtest")
    assert not runnable("visualizer.engine")  # a package without __main__.py


def test_an_alias_table_that_drifts_is_found():
    text = "| alias | hub id | family |\n|---|---|---|\n| `sd15` | `a/b` | SD |\n| `old` | `c/d` | SD |\n\nafter\n"
    (rows,) = alias_tables(text)
    assert table_aliases(rows) == ["sd15", "old"] and rows[0]["hub id"] == "`a/b`"
    assert alias_tables("| model | size |\n|---|---|\n| sd15 | 512 |\n") == []


def test_a_changed_tolerance_is_found():
    assert tolerances_in(["assert x <= 2 / 255", "IMAGE_TOLERANCE = 0.5 / 255", "y * 255 // size"]) == {2, 0.5}
    assert stated_tolerance("a largest difference of **2/255** on any pixel") == 2
