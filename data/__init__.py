"""Input pipeline: bytes on disk -> per-process batches -> global jax arrays.

Modules, in data-flow order:
  sources.py (+ source_base.py, tfrecords.py, fashion_mnist.py, image_folder.py)
                  where records come from: shard tables, reading, parsing
  order.py        the replayable order (shards, groups, shuffle windows) and its small state
  records.py      the raw record format and the checks that find bad records
  captions.py     captions for labelled images; zeroshot_texts.py  zero-shot names and prompts
  ops.py          preprocessing ops (registry PP_OPS); preprocess.py  the op-string parser
  tokenizers.py   WordPiece / SentencePiece in the tf.data graph
  config_blocks.py  config blocks as checked frozen dataclasses, and ConfigError (every config
                  reader's, not only the input's)
  config.py       the config.input block and its validation
  processing.py   per-record parse, seed, caption, check, op string; skipped-record counts
  transfer.py     uint8 images scaled on the device
  pipeline.py     batching, global arrays, device prefetch, exact resume

Nothing is imported here, so `import data.zeroshot_texts` stays cheap.
"""
