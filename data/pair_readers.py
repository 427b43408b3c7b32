"""Image-caption pairs from the files researchers bring: manifests, image folders, tar shards.

  csv, tsv    a header row naming the columns, then one pair per row; relative image paths
              are relative to the manifest's folder
  jsonl       one JSON object per line (.jsonl, or .json holding JSON lines)
  folder      every image (.jpg .jpeg .png .webp .gif .bmp) under a folder, at any depth, with
              its caption in a text file of the same stem beside it: a/001.jpg + a/001.txt
  webdataset  tar shards (.tar, .tar.gz, .tgz) as img2dataset writes them and open_clip reads
              them: members grouped by key (the member path up to the first dot of its file
              name); the image is the jpg/jpeg/png/webp member, the caption the txt member or
              else the "caption" (or "text") field of the json member

Readers yield, in input order, a `Row` for each pair they could read and a `Skip` (reason,
location) for each one they could not, so a conversion counts bad rows instead of stopping at
the first. Image files are not opened here and sidecar captions not read: the converter does
that on its worker threads. Only problems with a whole input (an unknown format, a header
without the requested columns) raise `InputError`. Paths go through tf.io.gfile (gs:// works).
"""

from __future__ import annotations

import csv
import json
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from data.lazy_tf import tf
from data.paths import is_remote

FORMATS = ("csv", "tsv", "jsonl", "folder", "webdataset")
FOLDER_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # in order of preference
_EXTENSION_FORMATS = (
    ((".csv",), "csv"),
    ((".tsv",), "tsv"),
    ((".jsonl", ".json"), "jsonl"),
    ((".tar", ".tar.gz", ".tgz"), "webdataset"),
)

# Why a row was left out; the converter adds the image reasons.
SKIP_REASONS = {
    "missing_file": "input file not found",
    "unreadable_tar": "tar shard unreadable from here on",
    "bad_csv": "row the csv module cannot parse",
    "short_row": "fewer fields than the header",
    "long_row": "more fields than the header (an unquoted separator in a caption?)",
    "bad_json": "line is not a JSON object",
    "not_utf8": "text is not valid UTF-8",
    "missing_field": "no image or no caption",
    "not_text": "image path or caption is not a string",
    "empty_caption": "caption is empty",
    "missing_image": "image file not found",
    "unreadable_image": "image file cannot be read",
    "undecodable_image": "image bytes do not decode",
}


class InputError(ValueError):
    """An input the converter cannot use at all (as opposed to one bad row in it)."""


class RowError(Exception):
    """One row cannot be used, for `reason` (a key of SKIP_REASONS)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Row:
    """One pair as read, before its image is checked.

    location: where it came from, "pairs.csv:12" or "shard.tar:000123.jpg".
    image: the encoded bytes (tar members) or the path of the image file.
    caption: the caption as stored (str, or bytes from a tar member), cleaned by clean_caption;
      None when caption_file (an image folder's sidecar) holds it.
    """

    location: str
    image: bytes | str
    caption: str | bytes | None = None
    caption_file: str | None = None


@dataclass(frozen=True)
class Skip:
    """A row left out: where, why (a key of SKIP_REASONS), and the error text if there was one."""

    location: str
    reason: str
    detail: str = ""


def clean_caption(raw: str | bytes) -> str:
    """The caption without surrounding whitespace (and byte-order mark); RowError if unusable."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise RowError("not_utf8", str(error)) from error
    elif not isinstance(raw, str):
        raise RowError("not_text", f"caption is a {type(raw).__name__}")
    _check_utf8(raw)
    caption = raw.strip().lstrip("\ufeff").strip()
    if not caption:
        raise RowError("empty_caption")
    return caption


def _check_utf8(text: str) -> None:
    """Text decoded with surrogateescape (or JSON "\\udcxx" escapes) holds lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise RowError("not_utf8", str(error)) from error


def resolve(base_dir: str, path: str) -> str:
    """`path` relative to `base_dir` unless it is absolute or a URL (gs://...)."""
    if is_remote(path) or posixpath.isabs(path):
        return path
    joined = posixpath.join(base_dir, path)
    return joined if is_remote(joined) else posixpath.normpath(joined)


# ---------------------------------------------------------------------------------------------
# Which files, in which format.

_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}|\{([^{}]*,[^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Shell-style braces: "s/{00..02}.tar" -> s/00.tar s/01.tar s/02.tar; "{a,b}" -> a b.

    Ranges whose two ends have the same number of digits are zero-padded to that width.
    """
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    if match.group(3) is not None:
        options = match.group(3).split(",")
    else:
        first, last = match.group(1), match.group(2)
        width = len(first) if len(first) == len(last) else 0
        step = 1 if int(last) >= int(first) else -1
        options = [str(n).zfill(width) for n in range(int(first), int(last) + step, step)]
    return [name for option in options for name in expand_braces(head + option + tail)]


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Input arguments -> file or folder names: "::"-joined lists (open_clip's way of naming
    several sources), brace patterns, then globs (sorted); names without wildcards stay as they
    are even if absent, so one missing shard of a range is counted, not fatal."""
    names = []
    for argument in inputs:
        for part in str(argument).split("::"):
            for name in expand_braces(part):
                if any(char in name for char in "*?["):
                    matches = sorted(tf.io.gfile.glob(name))
                    if not matches:
                        raise InputError(f"no files match {name}")
                    names += matches
                else:
                    names.append(name)
    return names


def detect_format(path: str) -> str:
    """One of FORMATS, from the file's extension, or "folder" for a directory."""
    lower = path.lower()
    for suffixes, name in _EXTENSION_FORMATS:
        if lower.endswith(suffixes):
            return name
    if tf.io.gfile.isdir(path):
        return "folder"
    if not tf.io.gfile.exists(path):
        raise InputError(f"{path}: no such file or folder")
    known = ", ".join(s for suffixes, _ in _EXTENSION_FORMATS for s in suffixes)
    raise InputError(f"{path}: cannot tell the format (expected a folder or {known}); use --format")


def plan_inputs(inputs: Sequence[str], input_format: str | None = None) -> list[tuple[str, str]]:
    """(path, format) of every input, checked before any row is read."""
    if input_format is not None and input_format not in FORMATS:
        raise InputError(f"unknown format {input_format!r}; one of {', '.join(FORMATS)}")
    return [(path, input_format or detect_format(path)) for path in expand_inputs(inputs)]


def read_pairs(
    plan: Sequence[tuple[str, str]], image_column: str = "image", caption_column: str = "caption"
) -> Iterator[Row | Skip]:
    """Rows and skips of every (path, format) in `plan`, in order."""
    for path, input_format in plan:
        if input_format == "folder":
            yield from read_folder(path)
        elif not tf.io.gfile.exists(path):
            yield Skip(path, "missing_file")
        elif input_format in ("csv", "tsv"):
            delimiter = "," if input_format == "csv" else "\t"
            yield from read_table(path, delimiter, image_column, caption_column)
        elif input_format == "jsonl":
            yield from read_jsonl(path, image_column, caption_column)
        else:
            yield from read_tar(path, caption_column)


# ---------------------------------------------------------------------------------------------
# Manifests.


def read_table(
    path: str, delimiter: str, image_column: str, caption_column: str
) -> Iterator[Row | Skip]:
    """CSV / TSV rows with a header; locations are path:line of the row's first line."""
    base_dir = posixpath.dirname(path)
    with tf.io.gfile.GFile(path, "rb") as f:
        # surrogateescape keeps undecodable bytes in the text, so one bad row is found and
        # skipped later instead of failing the whole file here.
        lines = (line.decode("utf-8", "surrogateescape") for line in f)
        reader = csv.reader(lines, delimiter=delimiter)
        header: list[str] | None = None
        last_line = 0
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as error:
                yield Skip(f"{path}:{last_line + 1}", "bad_csv", str(error))
                last_line = reader.line_num
                continue
            location = f"{path}:{last_line + 1}"
            last_line = reader.line_num
            if not fields:
                continue
            if header is None:
                header = [name.lstrip("\ufeff").strip() for name in fields]
                image_index, caption_index = _column_indices(
                    path, header, image_column, caption_column
                )
                continue
            if len(fields) != len(header):
                reason = "short_row" if len(fields) < len(header) else "long_row"
                yield Skip(location, reason, f"{len(fields)} fields, header has {len(header)}")
                continue
            yield _manifest_row(location, base_dir, fields[image_index], fields[caption_index])


def _column_indices(
    path: str, header: list[str], image_column: str, caption_column: str
) -> tuple[int, int]:
    missing = [name for name in (image_column, caption_column) if name not in header]
    if missing:
        raise InputError(
            f"{path}: no column {', '.join(map(repr, missing))} in the header {header}; "
            "name the columns with --image_column / --caption_column"
        )
    return header.index(image_column), header.index(caption_column)


def read_jsonl(path: str, image_column: str, caption_column: str) -> Iterator[Row | Skip]:
    """One JSON object per line; blank lines are ignored; locations are path:line."""
    base_dir = posixpath.dirname(path)
    with tf.io.gfile.GFile(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            location = f"{path}:{number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield Skip(location, "not_utf8", str(error))
                continue
            if not text.strip():
                continue
            try:
                item = json.loads(text)
            except json.JSONDecodeError as error:
                yield Skip(location, "bad_json", str(error))
                continue
            if not isinstance(item, dict):
                yield Skip(location, "bad_json", f"a JSON {type(item).__name__}, not an object")
                continue
            absent = [key for key in (image_column, caption_column) if item.get(key) is None]
            if absent:
                yield Skip(location, "missing_field", f"no {', '.join(map(repr, absent))}")
                continue
            yield _manifest_row(location, base_dir, item[image_column], item[caption_column])


def _manifest_row(location: str, base_dir: str, image: object, caption: object) -> Row | Skip:
    if not isinstance(image, str):
        return Skip(location, "not_text", f"image is a {type(image).__name__}")
    try:
        _check_utf8(image)
    except RowError as error:
        return Skip(location, error.reason, error.detail)
    image = image.strip()
    if not image:
        return Skip(location, "missing_field", "empty image path")
    return Row(location, resolve(base_dir, image), caption)


# ---------------------------------------------------------------------------------------------
# Image folders and WebDataset shards.


def list_files(root: str) -> list[str]:
    """Every path under `root`, at any depth, sorted.

    One glob per depth, down to the first depth with nothing (local folders and gs:// list the
    sub-folders of each depth): an object store is listed a few times instead of being asked
    about each file, as a directory walk would.
    """
    paths, pattern = [], root
    while level := tf.io.gfile.glob(pattern := posixpath.join(pattern, "*")):
        paths += level
    return sorted(paths)


def read_folder(root: str) -> Iterator[Row | Skip]:
    """Images under `root` (sorted, at any depth) with their same-stem .txt caption files."""
    root = root.rstrip("/") or "/"
    if not tf.io.gfile.isdir(root):
        yield Skip(root, "missing_file", "no such folder")
        return
    paths = list_files(root)
    present = set(paths)
    for image in paths:
        stem, extension = posixpath.splitext(image)
        if extension.lower() not in FOLDER_IMAGE_EXTENSIONS:
            continue
        if f"{stem}.txt" in present:
            yield Row(image, image, caption_file=f"{stem}.txt")
        else:
            yield Skip(image, "missing_field", f"no caption file {posixpath.basename(stem)}.txt")


def _member_key(name: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member, "a/001.seg.png" -> ("a/001", "seg.png"); None for
    names without an extension and hidden files (macOS tar adds ._name companions)."""
    directory, base = posixpath.split(name)
    if base.startswith(".") or "." not in base:
        return None
    stem, extension = base.split(".", 1)
    return posixpath.join(directory, stem), extension.lower()


def read_tar(path: str, caption_column: str = "caption") -> Iterator[Row | Skip]:
    """Streams a (possibly remote, possibly compressed) tar shard, one row per key.

    Members of a key are consecutive, as WebDataset writers store them. A damaged tar keeps the
    rows before the damage and counts one unreadable_tar skip.
    """
    key, members, last_member = None, {}, "start"
    try:
        with tf.io.gfile.GFile(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as archive:
            for member in archive:
                last_member = member.name
                named = _member_key(member.name) if member.isfile() else None
                if named is None:
                    continue
                if named[0] != key:
                    if members:
                        yield _tar_row(path, key, members, caption_column)
                    key, members = named[0], {}
                members[named[1]] = (member.name, archive.extractfile(member).read())
    except (tarfile.TarError, OSError, EOFError, zlib.error, tf.errors.OpError) as error:
        yield Skip(f"{path}:{last_member}", "unreadable_tar", str(error))
        return
    if members:
        yield _tar_row(path, key, members, caption_column)


def _tar_row(
    path: str, key: str, members: dict[str, tuple[str, bytes]], caption_column: str
) -> Row | Skip:
    image_extension = next((e for e in TAR_IMAGE_EXTENSIONS if e in members), None)
    if image_extension is None:
        return Skip(f"{path}:{key}", "missing_field", f"no {'/'.join(TAR_IMAGE_EXTENSIONS)} member")
    image_name, image = members[image_extension]
    if "txt" in members:
        return Row(f"{path}:{image_name}", image, members["txt"][1])
    if "json" not in members:
        return Skip(f"{path}:{key}", "missing_field", "no txt or json member")
    json_name, raw = members["json"]
    try:
        item = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        reason = "not_utf8" if isinstance(error, UnicodeDecodeError) else "bad_json"
        return Skip(f"{path}:{json_name}", reason, str(error))
    fields = dict.fromkeys((caption_column, "caption", "text"))
    caption = next((item[f] for f in fields if isinstance(item, dict) and f in item), None)
    if caption is None:
        return Skip(f"{path}:{json_name}", "missing_field", f"no {' or '.join(fields)} field")
    return Row(f"{path}:{image_name}", image, caption)
