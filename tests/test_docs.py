"""The README and docs/ as users read them: short, runnable set-up, working links, product wording only."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_COMMAND = "bash .ci/setup && .venv/bin/python -m pytest -q"


def test_readme_is_short_and_starts_with_the_setup_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 150
    first_block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    assert TEST_COMMAND in first_block.splitlines()
    ci = (ROOT / ".ci" / "run").read_text()
    setup, test = TEST_COMMAND.split(" && ")
    assert setup in ci and f"\n{test}\n" in ci  # .ci/run runs exactly the README's test command


def test_relative_links_in_readme_and_docs_point_at_files():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"


def test_docs_speak_of_the_product_not_of_work_sessions():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for page in pages:
        match = re.search(r"sessions? [0-9]", page.read_text(), flags=re.IGNORECASE)
        assert match is None, f"{page.relative_to(ROOT)}: {match.group(0)!r}"
