"""The repository URL lives in hesskit/_urls.py; README badges and notebook install cells must agree."""

from __future__ import annotations

import json
import re
from pathlib import Path

from hesskit import _urls

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _github_refs(text: str) -> set[str]:
    """(owner/name, ref) of every link that opens or installs a repository at a ref (Colab's
    .../blob/REF/..., a pip spec's ...@REF); links to other projects' issues are not refs."""
    return set(re.findall(r"github(?:\.com)?/([\w.-]+/[\w.-]+)(?:/blob/|/tree/|@)([\w.-]+)", text))


def test_every_notebook_installs_from_and_links_to_the_constant():
    for path in NOTEBOOKS:
        cells = json.loads(path.read_text())["cells"]
        text = "\n".join("".join(c["source"]) for c in cells)
        assert _urls.colab_install_spec() in text, path.name
        assert _urls.colab_url(path.name) in text and _urls.binder_url(path.name) in text, path.name
        assert _github_refs(text) <= {(_urls.REPOSITORY, _urls.REF)}, path.name


def test_readme_badges_match_the_constant_and_cover_every_notebook():
    readme = (ROOT / "README.md").read_text()
    assert _github_refs(readme) <= {(_urls.REPOSITORY, _urls.REF)}
    for path in NOTEBOOKS:
        assert _urls.colab_url(path.name) in readme and _urls.binder_url(path.name) in readme, path.name
