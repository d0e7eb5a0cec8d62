"""`clean_text`: one review's markup out, entities decoded, unicode NFKC-normalised, whitespace collapsed; the same for a dataset row and a served request."""

from __future__ import annotations

import html
import re
import unicodedata

# IMDB reviews use "<br /><br />" between paragraphs; a few carry <i>, <b>, <a ...>.
# Only known tag names are removed, so "a < b and c > d" or "x<y and z>w" survive.
HTML_TAG = re.compile(
    r"</?(?:br|p|i|b|u|em|strong|a|hr|span|div|font|spoiler|sub|sup|li|ul|ol|h[1-6]|blockquote)"
    r"(?:\s[^<>]{0,200})?\s*/?>",
    re.IGNORECASE,
)


# Zero-width and BOM characters that NFKC keeps but a tokenizer should never see.
INVISIBLE = re.compile("[\u200b\u200c\u200d\u2060\ufeff]")
WHITESPACE = re.compile(r"\s+")


def clean_text(raw: str) -> str:
    """Markup out, entities decoded, unicode NFKC-normalised, whitespace collapsed."""
    text = HTML_TAG.sub(" ", raw)
    text = html.unescape(text)
    text = unicodedata.normalize("NFKC", text)
    text = INVISIBLE.sub("", text)
    return WHITESPACE.sub(" ", text).strip()
