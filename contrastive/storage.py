"""Reading and writing the files of a run wherever its workdir lives: local, gs://, s3://, ram://.

User paths are strings handled by tf.io.gfile, never pathlib or os: `pathlib.Path("gs://b/run")`
is the local path "gs:/b/run", so a bucket workdir would silently become a local folder. gfile
serves local paths, Cloud Storage, S3 and TF's in-memory `ram://` filesystem (which the tests
use as a stand-in for a bucket).

Object stores cannot append. Files that grow during a run (metrics.jsonl) are therefore written
through one open handle whose flush uploads the whole object so far (TF's GCS writer), and small
files (config.json, plots) are written whole.
"""

from __future__ import annotations

import posixpath

from data.lazy_tf import tf
from data.paths import is_remote
from data.paths import read_bytes as read_bytes  # local files without TensorFlow, URLs by gfile

# Schemes tensorstore (which orbax uses for array data) can write to besides local files.
CHECKPOINT_SCHEMES = ("gs://", "s3://")


def join(base: str, *parts: str) -> str:
    """Joins with "/" without normalising the scheme away ("gs://b" + "x" -> "gs://b/x")."""
    return posixpath.join(str(base), *parts)


def absolute(path: str) -> str:
    """Local paths made absolute (processes may run from other folders); URLs unchanged."""
    path = str(path)
    return path if is_remote(path) else posixpath.abspath(path)


def exists(path: str) -> bool:
    return tf.io.gfile.exists(str(path))


def makedirs(path: str) -> None:
    tf.io.gfile.makedirs(str(path))


def remove(path: str) -> None:
    """Deletes a file if it exists."""
    if tf.io.gfile.exists(str(path)):
        tf.io.gfile.remove(str(path))


def read_text(path: str) -> str:
    with tf.io.gfile.GFile(str(path), "r") as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    """Writes a whole file via a temporary name, so a crash leaves the old file or the new one."""
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str, data: bytes) -> None:
    path = str(path)
    makedirs(posixpath.dirname(path) or ".")
    temporary = f"{path}.tmp"
    with tf.io.gfile.GFile(temporary, "wb") as f:
        f.write(data)
    tf.io.gfile.rename(temporary, path, overwrite=True)


def open_for_writing(path: str):
    """A text handle for a file written over the whole run (see module docstring)."""
    path = str(path)
    makedirs(posixpath.dirname(path) or ".")
    # Removed first: not every filesystem truncates on "w" (TF's ram:// keeps the old bytes).
    if tf.io.gfile.exists(path):
        tf.io.gfile.remove(path)
    return tf.io.gfile.GFile(path, "w")
