"""The repository URL lives in hesskit/urls.py; README badges and notebook install cells must agree, the ref
they name must exist in this repository, and every badge must open a notebook that exists."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from urllib.parse import unquote

from hesskit import urls

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _github_refs(text: str) -> set[str]:
    """(owner/name, ref) of every link that opens or installs hesskit's repository at a ref (Colab's
    .../blob/REF/..., a pip spec's ...@REF); links to other projects' files and issues are theirs."""
    found = re.findall(r"github(?:\.com)?/([\w.-]+/[\w.-]+)(?:/blob/|/tree/|@)([\w.-]+)", text)
    return {(repo, ref) for repo, ref in found if repo == urls.REPOSITORY}


def test_every_notebook_installs_from_and_links_to_the_constant():
    for path in NOTEBOOKS:
        cells = json.loads(path.read_text())["cells"]
        text = "\n".join("".join(c["source"]) for c in cells)
        assert urls.colab_install_spec() in text, path.name
        assert urls.colab_url(path.name) in text and urls.binder_url(path.name) in text, path.name
        assert _github_refs(text) <= {(urls.REPOSITORY, urls.REF)}, path.name


def test_readme_badges_match_the_constant_and_cover_every_notebook():
    readme = (ROOT / "README.md").read_text()
    assert _github_refs(readme) <= {(urls.REPOSITORY, urls.REF)}
    for path in NOTEBOOKS:
        assert urls.colab_url(path.name) in readme and urls.binder_url(path.name) in readme, path.name


def _git_ref_exists(ref: str) -> bool:
    """A branch or tag of this checkout (a fresh clone has the default branch as refs/heads/, a CI checkout of a
    pull request may only have it as refs/remotes/origin/)."""
    for full in (f"refs/heads/{ref}", f"refs/tags/{ref}", f"refs/remotes/origin/{ref}"):
        found = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", full],
                               capture_output=True, text=True)
        if found.returncode == 0:
            return True
    return False


def test_the_ref_that_badges_and_install_cells_name_exists():
    assert (ROOT / ".git").exists(), "run the tests in a git checkout of the repository"
    assert _git_ref_exists(urls.REF), (
        f"hesskit/urls.py names ref {urls.REF!r}, which is neither a branch nor a tag of this repository "
        "(git branch -a; git tag -l): Colab, Binder and pip would fail to open it")
    assert not _git_ref_exists("no-such-ref-" + "x" * 12)


def _badge_targets(text: str) -> set[tuple[str, str]]:
    """(ref, notebook path) of every Colab and Binder link."""
    colab = re.findall(r"colab\.research\.google\.com/github/[\w.-]+/[\w.-]+/blob/([\w.-]+)/([^)\s\]]+)", text)
    binder = re.findall(r"mybinder\.org/v2/gh/[\w.-]+/[\w.-]+/([\w.-]+)\?labpath=([^)\s\]&]+)", text)
    return {(ref, unquote(path)) for ref, path in colab + binder}


def test_every_badge_opens_an_existing_notebook_at_an_existing_ref():
    texts = {"README.md": (ROOT / "README.md").read_text()}
    texts.update({p.name: "\n".join("".join(c["source"]) for c in json.loads(p.read_text())["cells"]) for p in NOTEBOOKS})
    assert _badge_targets(texts["README.md"]) >= {(urls.REF, f"notebooks/{p.name}") for p in NOTEBOOKS}
    refs = set()
    for name, text in texts.items():
        targets = _badge_targets(text)
        assert targets, f"{name}: no Colab or Binder badge"
        for ref, path in targets:
            assert (ROOT / path).is_file(), f"{name}: a badge opens {path}, which does not exist"
            refs.add(ref)
        refs |= {ref for _, ref in _github_refs(text)}
    missing = sorted(ref for ref in refs if not _git_ref_exists(ref))
    assert not missing, f"badges or install cells name refs that are not in the repository: {missing}"
