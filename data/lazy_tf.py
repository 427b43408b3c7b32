"""TensorFlow, TF Text and TFDS, each imported on its first attribute access.

The input pipeline, tokenizers and storage need TensorFlow; the models, losses, optimizer and train
step do not. Importing it lazily lets the parts that only describe an experiment (config
validation, `scripts.benchmark step` on random batches) run on an accelerator host that has JAX but
no TensorFlow. Modules take `from data.lazy_tf import tf` and use it as the module; with
`from __future__ import annotations`, annotations such as `tf.Tensor` do not import it either.
"""

from __future__ import annotations

from etils import epy

with epy.lazy_imports(
    error_callback="this part of the project reads data with TensorFlow: install requirements.txt"
):
    import tensorflow as tf
    import tensorflow_datasets as tfds
    import tensorflow_text as tf_text

__all__ = ["tf", "tf_text", "tfds"]
