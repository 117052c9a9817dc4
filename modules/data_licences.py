"""The terms of use of local training data, as the README beside each data file states them (read when a model card
is written, so a card names the terms of the data it was trained on).

Two README layouts state them: a line ``Licence / terms as stated: ...`` (a ../shared/data folder, whose README
describes that one dataset), or a table with a licence column and a row per file (data/demo/README.md, where
"as above" repeats the row before). A README's own sentences about commercial use hold for every file it describes.
"""

import re
from pathlib import Path

_TERMS_LINE = re.compile(r"^licen[cs]e / terms as stated:\s*(.+)$", re.IGNORECASE | re.MULTILINE)
_NON_COMMERCIAL = re.compile(r"non-?commercial|\bNC\b", re.IGNORECASE)
_SEPARATOR_CELL = re.compile(r"^:?-+:?$")


def data_terms(path):
    """The terms the README beside a data file (or in a data folder, else beside it) states for it; None when none
    does."""
    path = Path(path)
    folders = [path, path.parent] if path.is_dir() else [path.parent]
    for readme in (folder / "README.md" for folder in folders):
        if not readme.is_file():
            continue
        text = readme.read_text(encoding="utf-8")
        found = _TERMS_LINE.search(text)
        terms = found.group(1).strip() if found else _table_terms(text, path.name)
        if terms:
            general = " ".join(_commercial_sentences(text))
            return f"{terms} (its README: {general})" if general else terms
    return None


def non_commercial(terms):
    """Whether stated terms rule out commercial use (non-commercial, CC BY-NC...)."""
    return bool(terms and _NON_COMMERCIAL.search(terms))


def _tables(text):
    """Every markdown table of ``text`` as a list of rows of cells (separator rows left out)."""
    table = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if not all(_SEPARATOR_CELL.match(cell) for cell in cells):
                table.append(cells)
        elif table:
            yield table
            table = []


def _table_terms(text, name):
    """The licence cell of ``name``'s row in a table with a licence column."""
    for header, *rows in _tables(text):
        column = next((i for i, cell in enumerate(header) if "licen" in cell.lower()), None)
        above = None
        for cells in rows if column is not None else ():
            terms = cells[column] if column < len(cells) else ""
            terms = above if terms.lower().startswith("as above") else terms
            if cells[0].strip("`").rstrip("/") == name:
                return terms
            above = terms
    return None


def _commercial_sentences(text):
    """Sentences of a README's prose (not tables, headings or its terms line) on commercial use."""
    prose = [line for line in text.splitlines()
             if line.strip() and line[0] not in "|#" and not _TERMS_LINE.match(line)]
    sentences = re.split(r"(?<=\.)\s+", " ".join(prose))
    return [sentence for sentence in sentences if "commercial" in sentence.lower()]
