"""Input pipeline: bytes on disk -> per-process batches -> global jax arrays.

Modules, in data-flow order:
  sources.py (+ source_base.py, tfrecords.py, fashion_mnist.py)  where records come from
  records.py      the raw record format and the checks that find bad records
  captions.py     captions for labelled images; zeroshot_texts.py  zero-shot names and prompts
  ops.py          preprocessing ops (registry PP_OPS); preprocess.py  the op-string parser
  tokenizers.py   WordPiece / SentencePiece in the tf.data graph
  config.py       the config.input block and its validation
  pipeline.py     shuffling, bad-record counts, batching, global arrays, exact resume

Nothing is imported here, so `import data.zeroshot_texts` stays cheap.
"""
