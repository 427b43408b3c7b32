"""Training captions for labelled images: templates x synonyms x attributes, chosen in the graph.

A labelled dataset becomes an image-text dataset by giving each image a caption drawn from its
class's caption list ("a product shot of a black pullover", "an ankle boot on a plain
background", ...). Variety (templates, synonyms, attributes, optionally CuPL sentences) keeps the
text tower from learning one fixed string per class.

Zero-shot evaluation uses CLIP's prompts ("a photo of a {c}."). A caption equal to such a prompt,
up to case, punctuation and spacing, for any class name is removed here, so the evaluation prompts
are never seen verbatim in training.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from data.lazy_tf import tf
from data.records import texts_pass_checks


def normalize_caption(text: str) -> str:
    """The key for prompt comparison: lower-case, punctuation removed, whitespace collapsed, and
    "an" read as "a" (CLIP's prompts say "a photo of a ankle boot.")."""
    text = re.sub(r"[^\w\s-]", " ", text.lower())
    return " ".join("a" if word == "an" else word for word in text.split())


def forbidden_captions(classnames: Iterable[str], templates: Sequence[str]) -> set[str]:
    """Normalized prompts (every template filled with every class name) training must avoid."""
    return {
        normalize_caption(template.replace("{c}", name))
        for name in classnames
        for template in templates
    }


@dataclass(frozen=True)
class Noun:
    """A way to name a class in a caption; `countable` nouns take "a"/"an" ("jeans" does not)."""

    text: str
    countable: bool = True


def noun_phrase(noun: Noun, attribute: str = "") -> str:
    """("pullover", "black") -> "a black pullover"; ("ankle boot", "") -> "an ankle boot"."""
    words = f"{attribute} {noun.text}".strip()
    if not noun.countable:
        return words
    article = "an" if words[0].lower() in "aeiou" else "a"
    return f"{article} {words}"


def build_class_captions(
    nouns_per_class: Sequence[Sequence[Noun]],
    templates: Sequence[str],
    attributes: Sequence[str],
    forbidden: set[str],
    sentences_per_class: Sequence[Sequence[str]] | None = None,
) -> list[list[str]]:
    """Caption lists, one per class: every template x noun x attribute, plus extra sentences.

    Args:
      nouns_per_class: [C][synonyms] ways to name each class.
      templates: strings with "{x}" where the noun phrase goes ("a product shot of {x}").
      attributes: adjectives; "" gives the bare noun.
      forbidden: normalized captions to drop (see forbidden_captions).
      sentences_per_class: optional [C][n] free sentences (e.g. CuPL descriptions).

    Returns [C][n_c] unique captions in a fixed order; raises if a class ends up with none.
    """
    if sentences_per_class is not None and len(sentences_per_class) != len(nouns_per_class):
        raise ValueError("sentences_per_class needs one list per class")
    result = []
    for c, nouns in enumerate(nouns_per_class):
        candidates = [
            template.replace("{x}", noun_phrase(noun, attribute))
            for template in templates
            for noun in nouns
            for attribute in attributes
        ]
        if sentences_per_class is not None:
            candidates += [s.strip() for s in sentences_per_class[c] if s.strip()]
        kept = [t for t in dict.fromkeys(candidates) if normalize_caption(t) not in forbidden]
        if not kept:
            raise ValueError(f"class {c} has no caption left after removing zero-shot prompts")
        result.append(kept)
    return result


class CaptionBank:
    """Per-class caption lists held as graph constants; `sample` picks one caption per example.

    Args:
      captions_per_class: [C][n_c] strings, n_c >= 1.
    """

    def __init__(self, captions_per_class: Sequence[Sequence[str]]) -> None:
        if not captions_per_class or any(len(c) == 0 for c in captions_per_class):
            raise ValueError("every class needs at least one caption")
        self.captions_per_class = [list(c) for c in captions_per_class]
        lengths = np.array([len(c) for c in self.captions_per_class], np.int64)
        self._flat = np.array(
            [t.encode("utf-8") for c in self.captions_per_class for t in c], dtype=object
        )
        self._starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self._lengths = lengths

    @property
    def num_classes(self) -> int:
        return len(self.captions_per_class)

    def passes_text_checks(self, max_text_bytes: int) -> bool:
        """True when every caption passes the pipeline's text checks (data/records.py), so that a
        drawn caption needs no check of its own."""
        return texts_pass_checks(self._flat.tolist(), max_text_bytes)

    def sample(self, label: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        """int [] label, int64 [2] stateless seed -> string [] caption, uniform over the class.

        Labels outside [0, C) raise (counted by the pipeline as an undecodable record).
        """
        label = tf.cast(label, tf.int64)
        # tf.gather checks bounds on CPU (where tf.data runs), so a bad label raises here.
        count = tf.gather(tf.constant(self._lengths), label)
        offset = tf.random.stateless_uniform([], seed=seed, maxval=count, dtype=tf.int64)
        index = tf.gather(tf.constant(self._starts), label) + offset
        return tf.gather(tf.constant(self._flat, tf.string), index)


# Templates for label-only datasets without hand-written synonyms ("{x}" as above).
GENERIC_TEMPLATES = (
    "a picture of {x}",
    "an image showing {x}",
    "a snapshot of {x}",
    "{x} in the picture",
    "there is {x} in this image",
    "a shot of {x}",
)


def generic_class_captions(classnames: Sequence[str], forbidden: set[str]) -> list[list[str]]:
    """[C][n] captions from GENERIC_TEMPLATES for classes named only by `classnames`
    (underscores read as spaces)."""
    nouns = [[Noun(name.replace("_", " "))] for name in classnames]
    return build_class_captions(nouns, GENERIC_TEMPLATES, [""], forbidden)
