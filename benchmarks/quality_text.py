"""The text of ``make quality``: Wikipedia articles from the sample dump that the gensim 4.4.0 wheel ships.

The dump (``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``,
MediaWiki export XML of early 2016, CC BY-SA) is read at run time straight from the wheel file (zipfile +
bz2; ``make quality`` downloads the wheel with pip into ``.cache/wheels``). Neither the text nor anything
derived from it is written to disk or committed.

What is kept, in dump order: the pages of the main namespace (``<ns>0</ns>``) that are not redirects, each
as its wikitext with the markup stripped (``strip_wiki``) and a non-empty body of at least
``MIN_ARTICLE_CHARS`` characters. ``strip_wiki`` keeps the running prose, list items and heading titles
and drops, in this order:

- everything from the first heading of an appendix section (See also, References, Notes, Footnotes,
  Citations, Sources, Bibliography, Further reading, External links) on;
- HTML comments; ``<ref>...</ref>`` and ``<ref .../>``; the contents and tags of ``<math>``,
  ``<gallery>``, ``<timeline>``, ``<score>``, ``<syntaxhighlight>``, ``<source>``, ``<pre>`` and
  ``<imagemap>``;
- templates ``{{...}}`` (nested: innermost first, so an infobox with templates inside goes whole) and
  tables ``{|...|}`` (nested the same way);
- internal links: ``[[target|text]]`` becomes text, ``[[target]]`` becomes target; a link to
  ``File:``, ``Image:``, ``Media:`` or ``Category:`` goes whole, caption and all (links inside a caption
  are resolved first, so the nesting does not matter), and so does an interlanguage link
  (``[[de:...]]``);
- external links: ``[http://... text]`` becomes text, a bare ``[http://...]`` goes;
- the bold and italic quotes (``'''``, ``''``), magic words (``__TOC__``), any remaining HTML tag (its
  text kept), HTML entities (decoded: ``&nbsp;`` becomes a space);
- heading markup: ``== History ==`` becomes the line ``History``; list markers (``*``, ``#``, ``:``,
  ``;`` at the start of a line) and indentation;
- lines left empty or holding only punctuation; runs of blank lines become one blank line.

Articles are joined with ``"\\n\\n"`` (``corpus_text``), tokenized with the model's tokenizer without
special tokens, and cut into the first N non-overlapping windows of a fixed length (``windows``).
"""

from __future__ import annotations

import bz2
import glob
import html
import io
import re
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parents[1]
WHEEL_GLOB = ".cache/wheels/gensim-4.4.0-*.whl"
MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
MIN_ARTICLE_CHARS = 200

APPENDIX = ("see also", "references", "notes", "footnotes", "citations", "sources", "bibliography",
            "further reading", "external links")  # fmt: skip
_APPENDIX_RE = re.compile(
    r"^=+\s*(?:" + "|".join(re.escape(a) for a in APPENDIX) + r")\s*=+\s*$", re.IGNORECASE | re.MULTILINE
)
_COMMENT_RE = re.compile(r"<!--.*?(?:-->|$)", re.DOTALL)
_REF_RE = re.compile(r"<ref\b[^>]*?/>|<ref\b[^>]*>.*?</ref\s*>", re.DOTALL | re.IGNORECASE)
_DROPPED_TAGS = ("math", "gallery", "timeline", "score", "syntaxhighlight", "source", "pre", "imagemap")
_DROPPED_TAG_RE = re.compile(
    r"<(" + "|".join(_DROPPED_TAGS) + r")\b[^>]*?(?:/>|>.*?</\1\s*>)", re.DOTALL | re.IGNORECASE
)
_TEMPLATE_RE = re.compile(r"\{\{(?:(?!\{\{|\}\}).)*\}\}", re.DOTALL)  # innermost {{...}}
_TABLE_RE = re.compile(r"\{\|(?:(?!\{\||\|\}).)*\|\}", re.DOTALL)  # innermost {|...|}
_LINK_RE = re.compile(r"\[\[((?:(?!\[\[|\]\]).)*)\]\]", re.DOTALL)  # innermost [[...]]
_MEDIA_LINK_RE = re.compile(r"^\s*(?:file|image|media|category)\s*:", re.IGNORECASE)
_LANGUAGE_LINK_RE = re.compile(r"^[a-z]{2,3}(?:-[a-z]+)*:[^|]*$")  # [[de:Anarchismus]]
_EXTERNAL_RE = re.compile(r"\[(?:https?:)?//[^\s\]]*\s*([^\]]*)\]")
_QUOTES_RE = re.compile(r"'{2,}")
_MAGIC_RE = re.compile(r"__[A-Z]+__")
_TAG_RE = re.compile(r"</?[a-zA-Z][^<>]*?/?>")
_HEADING_RE = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.MULTILINE)
_LIST_RE = re.compile(r"^[*#:;]+\s*", re.MULTILINE)
_PUNCT_ONLY_RE = re.compile(r"^[\W_]*$")


def find_wheel(path: str | Path | None = None) -> Path:
    """The gensim wheel: ``path`` if given, else the one ``make quality`` downloads into .cache/wheels."""
    if path is not None:
        wheel = Path(path)
        if not wheel.is_file():
            raise FileNotFoundError(f"--wheel {wheel}: no such file")
        return wheel
    found = sorted(glob.glob(str(ROOT / WHEEL_GLOB)))
    if not found:
        raise FileNotFoundError(
            f"no {WHEEL_GLOB}: run `make quality` (it downloads the wheel with pip) or pass --wheel PATH"
        )
    return Path(found[-1])


def read_dump(wheel: Path) -> bytes:
    """The dump's XML, decompressed in memory from the wheel."""
    with zipfile.ZipFile(wheel) as archive:
        return bz2.decompress(archive.read(MEMBER))


def iter_pages(xml: bytes) -> Iterator[tuple[str, str]]:
    """(title, wikitext) of each main-namespace page that is not a redirect, in dump order."""
    for _, element in ElementTree.iterparse(io.BytesIO(xml)):
        if element.tag.rsplit("}", 1)[-1] != "page":
            continue
        ns, title = element.findtext("{*}ns"), element.findtext("{*}title") or ""
        text = element.findtext("{*}revision/{*}text") or ""
        if ns == "0" and element.find("{*}redirect") is None:
            yield title, text
        element.clear()


def _innermost(pattern: re.Pattern[str], text: str, repl: object = "") -> str:
    """Replace innermost matches until none is left (nested constructs go from the inside out)."""
    while True:
        text, count = pattern.subn(repl, text)  # type: ignore[call-overload]
        if not count:
            return text


def _link(match: re.Match[str]) -> str:
    inner = match.group(1)
    if _MEDIA_LINK_RE.match(inner) or _LANGUAGE_LINK_RE.match(inner):
        return ""
    target, _, label = inner.partition("|")
    return (label.rsplit("|", 1)[-1] if label else target.lstrip(":")).strip()


def strip_wiki(text: str) -> str:
    """Plain text of one article's wikitext (see the module docstring for what is kept)."""
    appendix = _APPENDIX_RE.search(text)
    if appendix:
        text = text[: appendix.start()]
    text = _COMMENT_RE.sub("", text)
    text = _REF_RE.sub("", text)
    text = _DROPPED_TAG_RE.sub("", text)
    text = _innermost(_TEMPLATE_RE, text)
    text = _innermost(_TABLE_RE, text)
    text = _innermost(_LINK_RE, text, _link)
    text = _EXTERNAL_RE.sub(r"\1", text)
    text = _QUOTES_RE.sub("", text)
    text = _MAGIC_RE.sub("", text)
    text = _TAG_RE.sub("", text)
    text = html.unescape(text).replace("\xa0", " ")
    text = _HEADING_RE.sub(r"\2", text)
    text = _LIST_RE.sub("", text)
    lines, blank = [], True
    for line in text.splitlines():
        line = re.sub(r"[ \t]+", " ", line).strip()
        if _PUNCT_ONLY_RE.match(line):
            if not blank:
                lines.append("")
            blank = True
        else:
            lines.append(line)
            blank = False
    return "\n".join(lines).strip()


def articles(xml: bytes) -> Iterator[tuple[str, str]]:
    """(title, plain text) of each kept article (see the module docstring), in dump order."""
    for title, wikitext in iter_pages(xml):
        text = strip_wiki(wikitext)
        if len(text) >= MIN_ARTICLE_CHARS:
            yield title, text


def corpus_text(wheel: Path) -> str:
    """Every kept article of the wheel's dump, joined with a blank line."""
    return "\n\n".join(text for _, text in articles(read_dump(wheel)))


def windows(ids: Sequence[int], size: int, count: int) -> list[list[int]]:
    """The first ``count`` non-overlapping windows of ``size`` tokens (ValueError if ``ids`` is too short)."""
    if size < 2 or count < 1:
        raise ValueError(f"need windows of at least 2 tokens and at least one window, got {size} x {count}")
    if len(ids) < size * count:
        raise ValueError(
            f"the text has {len(ids)} tokens: {count} windows of {size} need {size * count} "
            f"(at most {len(ids) // size} fit)"
        )
    return [list(ids[i * size : (i + 1) * size]) for i in range(count)]
