"""Trains a SentencePiece tokenizer (pad id 0) on a text file, one sentence per line.

    python -m scripts.train_tokenizer --input corpus.txt --vocab_size 8000 --output tok/sp

writes tok/sp.model and tok/sp.vocab; use it in an op string as
tokenize(max_len=..., model='sentencepiece:tok/sp.model').
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scripts import terminal


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="text file, one sentence per line")
    parser.add_argument("--vocab_size", type=terminal.positive_int, required=True)
    parser.add_argument("--output", required=True, help="model prefix: writes PREFIX.model")
    parser.add_argument(
        "--model_type", default="unigram", choices=["unigram", "bpe", "word", "char"]
    )
    parser.add_argument("--character_coverage", type=float, default=1.0)
    terminal.add_verbose_flag(parser)
    args = parser.parse_args(argv)
    terminal.quiet_libraries(args.verbose)
    # Imported after parsing: --help stays fast and the logging settings above apply.
    from data.tokenizers import train_sentencepiece

    if not Path(args.input).is_file():
        print(f"error: no file {args.input}", file=sys.stderr)
        return 1
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    try:
        model = train_sentencepiece(
            args.input, args.vocab_size, args.output, args.model_type, args.character_coverage
        )
    except RuntimeError as e:  # sentencepiece reports bad settings (vocab too large) this way
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {model} (vocab size {args.vocab_size}, pad id 0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
