"""WordPiece (MiniLM vocabulary) and SentencePiece tokenizers against plain-Python references."""

from __future__ import annotations

import numpy as np
import pytest
import sentencepiece as spm
import tensorflow as tf

from data.package_files import minilm_vocab_path
from data.tokenizers import (
    SentencepieceTokenizer,
    WordpieceTokenizer,
    make_tokenizer,
    train_sentencepiece,
)


@pytest.fixture(scope="module")
def vocab() -> dict[str, int]:
    with open(minilm_vocab_path(), encoding="utf-8") as f:
        return {line.rstrip("\n"): i for i, line in enumerate(f)}


def reference_wordpiece(text: str, vocab: dict[str, int]) -> list[int]:
    """BERT uncased for ASCII text: lower-case, split on spaces and punctuation, greedy longest
    match with "##" continuations, [UNK] for unsplittable words."""
    words, word = [], ""
    for ch in text.lower():
        if ch.isspace():
            words, word = words + [word] if word else words, ""
        elif not ch.isalnum():
            words, word = words + ([word] if word else []) + [ch], ""
        else:
            word += ch
    words += [word] if word else []
    ids = []
    for w in words:
        pieces, start = [], 0
        while start < len(w):
            end = len(w)
            while end > start and (("##" if start else "") + w[start:end]) not in vocab:
                end -= 1
            if end == start:
                pieces = [vocab["[UNK]"]]
                break
            pieces.append(vocab[("##" if start else "") + w[start:end]])
            start = end
        ids += pieces
    return ids


def test_minilm_vocab_has_pad_at_zero(vocab):
    assert vocab["[PAD]"] == 0
    tokenizer = make_tokenizer("minilm")
    assert (tokenizer.cls_id, tokenizer.sep_id) == (vocab["[CLS]"], vocab["[SEP]"])
    assert tokenizer.vocab_size == len(vocab) == 30522


@pytest.mark.parametrize(
    "text",
    [
        "a photo of an ankle boot",
        "A Product-Shot of a BLACK pullover, photographed from the front!",
        "unaffable tokenizers handle zzqxj words",
    ],
)
def test_wordpiece_matches_reference(text, vocab):
    ids = make_tokenizer("minilm").tokenize(tf.constant(text), 48).numpy()
    expected = [vocab["[CLS]"], *reference_wordpiece(text, vocab), vocab["[SEP]"]]
    assert ids.dtype == np.int32
    assert ids.tolist() == expected + [0] * (48 - len(expected))


def test_wordpiece_lowercases_and_strips_accents():
    tokenizer = make_tokenizer("minilm")
    np.testing.assert_array_equal(
        tokenizer.tokenize(tf.constant("Café SHOE"), 8),
        tokenizer.tokenize(tf.constant("cafe shoe"), 8),
    )


def test_wordpiece_truncation_keeps_sep_and_batches(vocab):
    tokenizer = make_tokenizer("minilm")
    ids = tokenizer.tokenize(tf.constant(["one two three four five six", "shoe"]), 5).numpy()
    one_two_three = reference_wordpiece("one two three", vocab)
    assert ids.shape == (2, 5)
    assert ids[0].tolist() == [vocab["[CLS]"], *one_two_three, vocab["[SEP]"]]
    assert ids[1].tolist() == [vocab["[CLS]"], vocab["shoe"], vocab["[SEP]"], 0, 0]


def test_wordpiece_rejects_vocab_without_pad_at_zero(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("[UNK]\n[PAD]\n[CLS]\n[SEP]\nshoe\n")
    with pytest.raises(ValueError, match=r"\[PAD\] is id 1"):
        WordpieceTokenizer(path)


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("sp")
    corpus = root / "corpus.txt"
    words = ["shoe", "bag", "coat", "dress", "boot", "shirt", "sandal"]
    corpus.write_text(
        "\n".join(
            f"a photo of a {w} number {i} on a plain background" for i in range(60) for w in words
        )
    )
    return train_sentencepiece(corpus, 48, root / "sp")


def test_sentencepiece_matches_python_sentencepiece(sentencepiece_model):
    processor = spm.SentencePieceProcessor(model_file=str(sentencepiece_model))
    assert processor.pad_id() == 0 and processor.get_piece_size() == 48
    tokenizer = SentencepieceTokenizer(sentencepiece_model)
    texts = ["a photo of a boot", "a coat on a plain background number 7"]
    ids = tokenizer.tokenize(tf.constant(texts), 40).numpy()
    for row, text in zip(ids, texts, strict=True):
        expected = processor.encode(text)
        assert len(expected) < 40
        assert row.tolist() == expected + [0] * (40 - len(expected))


def test_sentencepiece_eos_survives_truncation(sentencepiece_model):
    processor = spm.SentencePieceProcessor(model_file=str(sentencepiece_model))
    tokenizer = make_tokenizer(f"sentencepiece:{sentencepiece_model}", add_eos=True)
    ids = tokenizer.tokenize(tf.constant("a photo of a sandal number 12"), 4).numpy().tolist()
    assert ids == processor.encode("a photo of a sandal number 12")[:3] + [processor.eos_id()]


def test_sentencepiece_rejects_models_without_pad_zero(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"a bag and a shoe {i}" for i in range(50)))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "default"), vocab_size=25, minloglevel=2
    )
    with pytest.raises(ValueError, match="pad id -1"):
        SentencepieceTokenizer(tmp_path / "default.model")


def test_unknown_tokenizer_spec_lists_the_forms():
    with pytest.raises(ValueError, match="minilm.*wordpiece.*sentencepiece"):
        make_tokenizer("gpt2")


@pytest.mark.parametrize("kind", ["wordpiece", "sentencepiece"])
def test_a_tokenizer_first_used_inside_one_dataset_graph_serves_others(kind, sentencepiece_model):
    # The TF Text op is built at the first tokenize call, which here comes while tf.data traces
    # a map function; a second dataset's graph and eager code must be able to use it too.
    if kind == "wordpiece":
        tokenizer = WordpieceTokenizer(minilm_vocab_path())
    else:
        tokenizer = SentencepieceTokenizer(sentencepiece_model)
    texts = ["a photo of a boot", "a plain coat"]
    streams = [
        tf.data.Dataset.from_tensor_slices(texts).map(lambda t: tokenizer.tokenize(t, 12))
        for _ in range(2)
    ]
    first, second = ([row.tolist() for row in stream.as_numpy_iterator()] for stream in streams)
    assert first == second == tokenizer.tokenize(tf.constant(texts), 12).numpy().tolist()
