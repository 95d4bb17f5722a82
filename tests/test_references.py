"""REFERENCES.md is the one list of papers; the README and every notebook cite from it.

Checked here, for the README and every notebook:

- each entry of a notebook's **References.** cell names a paper of the list by its title (or the
  part before the title's colon, or an "Also cited as" name), with the list's authors in the
  list's order (or its first authors and "et al.") and the list's year;
- each citation in running text ("Kunstner et al. 2019", "Hassibi & Stork, NIPS 1992",
  "Hutchinson (1989)") names the first authors (all authors, without "et al.") and the year of a
  paper in the list;
- every repository file they mention (`bench/optimizers.py`, `quantization.md`, ...) exists.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIST = ROOT / "REFERENCES.md"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
DOCUMENTS = [ROOT / "README.md", *NOTEBOOKS]

YEAR = r"(?:1[89]\d\d|20\d\d)"


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip()


def _fold(text: str) -> str:
    """Case, accents and punctuation folded away: for comparing titles and surnames."""
    text = unicodedata.normalize("NFKD", text).casefold().replace("ł", "l")
    return re.sub(r"[^0-9a-z]+", "", text)


def _surname(author: str) -> str:
    """'J. M. Cohen' -> 'Cohen', 'C. F. Van Loan' -> 'Van Loan', 'W. E' -> 'E'."""
    tokens = author.split()
    while len(tokens) > 1 and re.fullmatch(r"\w\.(?:-\w\.)?", tokens[0]):
        tokens.pop(0)
    return " ".join(tokens)


@dataclass
class Citation:
    authors: list[str]  # as written, "et al." removed
    truncated: bool  # ended with "et al."
    title: str
    year: str | None  # the first year after the title, outside parentheses


def _without_parentheses(text: str) -> str:
    while True:
        stripped = re.sub(r"\([^()]*\)", "", text)
        if stripped == text:
            return text
        text = stripped


def parse_citation(text: str) -> Citation | None:
    """'A. B, C. D, *Title*, Venue 2019 (note).' -> Citation; None without an italic title."""
    match = re.match(r"(?P<authors>[^*]*?)\*(?P<title>[^*]+)\*(?P<rest>.*)", _norm(text), re.S)
    if not match:
        return None
    authors = match["authors"].rsplit(":", 1)[-1].strip(" ,")  # drop a label such as "The optimizers:"
    truncated = authors.endswith("et al.")
    authors = authors.removesuffix("et al.").strip(" ,")
    rest = re.sub(r"arXiv:\d{4}\.\d{4,5}", "arXiv", _without_parentheses(match["rest"]))
    year = re.search(rf"\b({YEAR})\b", rest)
    return Citation([a.strip() for a in authors.split(",") if a.strip()], truncated, match["title"].strip(),
                    year and year[1])


@dataclass
class Entry:
    key: str
    citation: Citation
    aliases: list[str]

    @property
    def titles(self) -> set[str]:
        title = self.citation.title
        return {_fold(title), _fold(title.split(":")[0]), *map(_fold, self.aliases)}

    @property
    def surnames(self) -> list[str]:
        return [_fold(_surname(a).split()[-1]) for a in self.citation.authors]


def load_list() -> dict[str, Entry]:
    entries = {}
    for line in LIST.read_text(encoding="utf-8").splitlines():
        match = re.match(r"- `(?P<key>[a-z0-9]+)` (?P<body>.+)", line)
        if not match:
            continue
        assert match["key"] not in entries, f"REFERENCES.md: key {match['key']} twice"
        citation = parse_citation(match["body"])
        assert citation and citation.authors and citation.year, f"REFERENCES.md: cannot parse {line!r}"
        entries[match["key"]] = Entry(match["key"], citation, re.findall(r"[Aa]lso cited as \*([^*]+)\*", match["body"]))
    return entries


ENTRIES = load_list()


def _split_top_level(text: str, separators: str) -> list[str]:
    """Split at any of `separators` outside (), [] and $...$."""
    parts, current, depth, math = [], "", 0, False
    for char in text:
        if char == "$":
            math = not math
        elif char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        if char in separators and depth == 0 and not math:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def _cells(path: Path) -> list[tuple[str, str]]:
    """(cell type, source) of a notebook, or the README as one markdown cell."""
    if path.suffix == ".ipynb":
        return [(c["cell_type"], "".join(c["source"])) for c in json.loads(path.read_text(encoding="utf-8"))["cells"]]
    return [("markdown", path.read_text(encoding="utf-8"))]


def reference_entries(path: Path) -> list[str]:
    """The entries of a document's **References.** paragraph(s), split at ' · ' and ';'."""
    entries = []
    for kind, source in _cells(path):
        if kind == "markdown" and "**References.**" in source:
            block = source.split("**References.**", 1)[1].split("\n\n")[0]
            entries += _split_top_level(block, "·;")
    return entries


def match_entry(citation: Citation) -> list[str]:
    """The problems of one reference-list citation against REFERENCES.md (empty: it matches)."""
    hits = [e for e in ENTRIES.values() if _fold(citation.title) in e.titles]
    if len(hits) != 1:
        return [f"*{citation.title}*: {'not in' if not hits else 'ambiguous in'} REFERENCES.md"]
    entry, problems = hits[0], []
    known = entry.citation.authors
    cited = [_norm(a) for a in citation.authors]
    if citation.truncated:
        shortens = entry.citation.truncated or len(known) > max(len(cited), 2)  # "et al." stands for 2+ authors in all
        if cited != [_norm(a) for a in known[: len(cited)]] or not shortens:
            problems.append(f"{entry.key}: authors {', '.join(cited)} et al. are not the first authors of "
                            f"{', '.join(known)}")
    elif cited != [_norm(a) for a in known] or entry.citation.truncated:
        problems.append(f"{entry.key}: authors {', '.join(cited)}, expected {', '.join(known)}"
                        + (" et al." if entry.citation.truncated else ""))
    if citation.year != entry.citation.year:
        problems.append(f"{entry.key}: year {citation.year}, expected {entry.citation.year}")
    return problems


# Running-text citations: "Kunstner et al. 2019", "Kunstner et al. (NeurIPS 2019)", "Dong et al., ICCV 2019",
# "Yao et al., PyHessian, 2020", "Meyer, Musco, Musco & Woodruff, 2021", "Hassibi & Stork 1992".
NAME = r"[A-Z](?:[a-zà-ÿ][\w'’-]*)?"  # a surname: Kunstner, LeCun, E; not an acronym (KFC, OBQ)
LABELS = r"(?:[A-Z][\w-]*,? ){0,2}"
SEVERAL = re.compile(rf"\b(?P<names>{NAME}(?: et al\.|(?:, {NAME})*,? (?:&|and) {NAME})),? \(?{LABELS}(?P<year>{YEAR})\b")
ONE = re.compile(rf"(?<![&,] )(?<!and )\b(?P<names>{NAME}) \(?{LABELS}(?P<year>{YEAR})\b")


def in_text_citations(text: str) -> list[tuple[list[str], bool, str, str]]:
    """(surnames, et al., year, the matched text) of every running-text citation."""
    found = []
    for match in SEVERAL.finditer(text):
        names = match["names"]
        truncated = names.endswith(" et al.")
        names = names.removesuffix(" et al.")
        found.append(([_fold(n) for n in re.split(r",? (?:&|and) |, ", names)], truncated, match["year"], match[0]))
    # A lone surname is a citation only when it is the sole author of a listed paper ("Hutchinson (1989)").
    solo = {e.surnames[0] for e in ENTRIES.values() if len(e.surnames) == 1 and not e.citation.truncated}
    masked = SEVERAL.sub(lambda m: " " * len(m[0]), text)
    for match in ONE.finditer(masked):
        if _fold(match["names"]) in solo:
            found.append(([_fold(match["names"])], False, match["year"], match[0]))
    return found


def check_in_text(surnames: list[str], truncated: bool, year: str, text: str) -> list[str]:
    def fits(entry: Entry) -> bool:
        known = entry.surnames
        if truncated:
            return known[: len(surnames)] == surnames and (entry.citation.truncated or len(known) > max(len(surnames), 2))
        return known == surnames and not entry.citation.truncated

    candidates = [e for e in ENTRIES.values() if fits(e)]
    if not candidates:
        return [f"{text!r}: no paper in REFERENCES.md by these authors"]
    if year not in {e.citation.year for e in candidates}:
        return [f"{text!r}: REFERENCES.md has {', '.join(f'{e.key} ({e.citation.year})' for e in candidates)}"]
    return []


def test_the_list_parses_and_every_key_names_its_first_author_and_year():
    assert len(ENTRIES) > 50
    for key, entry in ENTRIES.items():
        stem = re.match(r"[a-z]+", key)[0]
        assert _fold(_surname(entry.citation.authors[0])).startswith(stem) or stem.startswith(
            _fold(_surname(entry.citation.authors[0]))), key
        assert entry.citation.year in key, key
    titles = [t for e in ENTRIES.values() for t in {_fold(e.citation.title), *map(_fold, e.aliases)}]
    assert len(titles) == len(set(titles)), "a title twice in REFERENCES.md"


def test_the_checks_can_fail():
    """The parser catches the slips this test was written for."""
    bad = parse_citation("F. Kunstner, P. Hennig, L. Balles, *Limitations of the empirical Fisher approximation for "
                         "natural gradient descent*, NeurIPS 2019.")
    assert match_entry(bad) and "authors" in match_entry(bad)[0]
    bad = parse_citation("Y. LeCun, J. S. Denker, S. A. Solla, *Optimal brain damage*, NeurIPS (NIPS) 1990.")
    assert match_entry(bad) == ["lecun1989: year 1990, expected 1989"]
    bad = parse_citation("M. F. Hutchinson, *A stochastic estimator of the trace of the influence matrix for Laplacian "
                         "smoothing splines*, Comm. Statist. Simulation Comput. 1990.")
    assert match_entry(bad) == ["hutchinson1989: year 1990, expected 1989"]
    assert match_entry(parse_citation("Z. Dong et al., *HAWQ-V2: Hessian aware trace-weighted quantization of "
                                      "neural networks*, NeurIPS 2020.")) == []
    assert match_entry(parse_citation("A. Nobody, *A paper that is not in the list*, ICML 2020."))
    for text, ok in [("(Kunstner et al. 2019)", True), ("Kunstner, Hennig & Balles (NeurIPS 2019)", False),
                     ("(Hassibi & Stork 1993)", False), ("Hassibi & Stork, NIPS 1992", True),
                     ("Hutchinson (1990)", False), ("Hutchinson (1989)", True), ("Sagun et al. (2017)", False),
                     ("Martens et al. 2015", False), ("Nobody et al. 2020", False)]:
        found = in_text_citations(text)
        assert len(found) == 1, text
        assert (check_in_text(*found[0]) == []) == ok, text


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_reference_lists_match_the_one_list(path):
    entries = reference_entries(path)
    if path.suffix == ".ipynb":
        assert entries, f"{path.name}: no **References.** paragraph"
    problems = []
    for text in entries:
        citation = parse_citation(text)
        if citation is None:
            if not re.search(r"https?://|[\w.-]+/[\w.-]+#\d+", text):  # a link or an issue (owner/repo#123)
                problems.append(f"neither a paper (authors, *title*, venue year) nor a link: {text!r}")
            continue
        problems += match_entry(citation)
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_running_text_cites_papers_of_the_list(path):
    problems = []
    for _, source in _cells(path):
        source = re.sub(r"\*\*References\.\*\*.*?(?:\n\n|$)", " ", source, flags=re.S)  # checked above
        for found in in_text_citations(_norm(source)):
            problems += check_in_text(*found)
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


FILE = re.compile(r"(?<![\w/.-])(?P<path>(?:\.\./)?(?:[\w.-]+/)*[\w-]+\.(?:md|py|ipynb|txt|toml|cfg|json|ya?ml|sh))\b")
SKIP_DIRS = {".git", ".venv", "build", ".pytest_cache", "__pycache__", ".ipynb_checkpoints"}


def _repository_files() -> set[str]:
    files = set()
    for path in ROOT.rglob("*"):
        parts = path.relative_to(ROOT).parts
        if path.is_file() and not SKIP_DIRS.intersection(parts) and not any(p.endswith(".egg-info") for p in parts):
            files.add(path.relative_to(ROOT).as_posix())
    return files


def mentioned_files(text: str) -> set[str]:
    """Paths and file names in `text`, except in URLs and in the text of links to other sites (a file of another
    repository is mentioned as a link: [train.py](https://github.com/owner/repo/blob/main/train.py))."""
    text = re.sub(r"\[[^\]]*\]\(https?://[^)]*\)", " ", text)
    text = re.sub(r"(?:https?://|www\.|github\.com/|colab\.research\.google\.com/)\S+", " ", text)
    return {m["path"] for m in FILE.finditer(text)}


@pytest.mark.parametrize("path", [*DOCUMENTS, LIST], ids=lambda p: p.name)
def test_every_mentioned_repository_file_exists(path):
    files = _repository_files()
    names = {f.rsplit("/", 1)[-1] for f in files}
    missing = []
    for mention in sorted(set().union(*(mentioned_files(s) for _, s in _cells(path)))):
        if "/" in mention:
            here = (path.parent / mention).resolve()
            exists = (ROOT / mention).is_file() or here.is_file()
        else:
            exists = mention in names
        if not exists:
            missing.append(mention)
    assert not missing, f"{path.name} mentions files that are not in the repository: {missing}"


def test_mentioned_files_are_found():
    assert mentioned_files("see quantization.md §9.2, bench/optimizers.py and ../notebooks/01_x.ipynb, not "
                           "https://github.com/a/b/blob/main/x.md, [y.py](https://github.com/a/b/blob/main/y.py) "
                           "or torch.func") == {
        "quantization.md", "bench/optimizers.py", "../notebooks/01_x.ipynb"}


UNPUBLISHED = re.compile(r"research (?:notes?|pilots?)|\bpilots? E\d|\bE\d pilot", re.I)


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_no_citation_of_unpublished_notes(path):
    """Evidence is a paper of the list, a repository file, or what the notebook itself shows; never notes or pilot
    experiments that a reader cannot open."""
    hits = [m[0] for _, source in _cells(path) for m in UNPUBLISHED.finditer(source)]
    assert not hits, f"{path.name} cites material that is not in the repository: {hits}"
