"""scripts.make_tfrecords end to end: every input format round-trips, --max_side, skipped rows
with their reasons and locations, shards published whole, progress, and a fast --help.

Shards are read back with tf.data and tf.train.Example directly, independently of
data/tfrecords.py's parser; images are made with Pillow.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
import uuid

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from data.pair_readers import expand_braces
from scripts import make_tfrecords
from tests import REPO


def image_bytes(width: int, height: int, fmt: str = "PNG", seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def write_images(folder, names, size=(12, 9)) -> dict[str, bytes]:
    """Small images of distinct content at folder/name; returns {name: bytes}."""
    written = {}
    for seed, name in enumerate(names):
        fmt = "JPEG" if name.endswith((".jpg", ".jpeg")) else name.rsplit(".", 1)[1].upper()
        data = image_bytes(*size, fmt=fmt, seed=seed)
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        written[name] = data
    return written


def read_shard(path) -> list[tuple[bytes, str]]:
    records = []
    for raw in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
        features = tf.train.Example.FromString(raw).features.feature
        assert set(features) == {"image", "caption"}
        records.append(
            (
                features["image"].bytes_list.value[0],
                features["caption"].bytes_list.value[0].decode("utf-8"),
            )
        )
    return records


def read_all(folder, prefix: str = "pairs") -> list[tuple[bytes, str]]:
    return [
        record
        for path in sorted(folder.glob(f"{prefix}-*.tfrecord"))
        for record in read_shard(path)
    ]


def run(capsys, inputs, output, flags: str = "", quiet: bool = True) -> tuple[int, str, str]:
    """main() on inputs (a path or a list) and an output prefix -> (exit code, stdout, stderr)."""
    inputs = [str(i) for i in inputs] if isinstance(inputs, list) else [str(inputs)]
    args = ["--input", *inputs, "--output", str(output), *flags.split()]
    code = make_tfrecords.main(args + ["--quiet"] * quiet)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def skip_counts(err: str) -> dict[str, int]:
    """{reason: count} from the summary lines "  reason: N (meaning), e.g. ..."."""
    return {m[1]: int(m[2]) for m in re.finditer(r"^  (\w+): (\d+) \(", err, re.MULTILINE)}


def skip_line(err: str, reason: str) -> str:
    return next(line for line in err.splitlines() if line.startswith(f"  {reason}:"))


# ---------------------------------------------------------------------------------------------
# Formats.


def test_csv_round_trip_keeps_bytes_and_fills_shards_round_robin(tmp_path, capsys):
    images = write_images(tmp_path / "img", [f"{i}.{'png' if i % 2 else 'jpg'}" for i in range(5)])
    captions = ['a dog, "running"', "café au lait", "three", "  padded  ", "five"]
    lines = ["image,caption"]
    for name, caption in zip(images, captions, strict=True):
        quoted = caption.replace('"', '""')
        lines.append(f'img/{name},"{quoted}"')
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    code, stdout, err = run(capsys, tmp_path / "pairs.csv", out / "pairs", "--num_shards 2")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        "pairs-00000-of-00002.tfrecord",
        "pairs-00001-of-00002.tfrecord",
    ]
    expected = [
        (data, caption.strip()) for data, caption in zip(images.values(), captions, strict=True)
    ]
    assert read_shard(out / "pairs-00000-of-00002.tfrecord") == expected[0::2]
    assert read_shard(out / "pairs-00001-of-00002.tfrecord") == expected[1::2]
    assert stdout.strip().splitlines() == [
        "wrote 5 records into 2 shards (5 rows read, 0 skipped); "
        f"config: files={out}/pairs-*.tfrecord"
    ]
    assert "skipped" not in err


def test_tsv_and_jsonl_with_named_columns_and_absolute_paths(tmp_path, capsys):
    images = write_images(tmp_path / "img", ["a.png", "b.jpg", "c.png"])
    absolute = str(tmp_path / "img" / "c.png")
    (tmp_path / "pairs.tsv").write_text(
        "title\tfilepath\n"
        "a photo of a\timg/a.png\n"
        "b, with a comma\timg/b.jpg\n"
        f"the third\t{absolute}\n"
    )
    code, _, err = run(
        capsys,
        tmp_path / "pairs.tsv",
        tmp_path / "tsv" / "pairs",
        "--image_column filepath --caption_column title",
    )
    assert code == 0, err
    assert read_all(tmp_path / "tsv") == [
        (images["a.png"], "a photo of a"),
        (images["b.jpg"], "b, with a comma"),
        (images["c.png"], "the third"),
    ]

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "pairs.jsonl").write_text(
        json.dumps({"path": "../img/b.jpg", "text": "jsonl b", "extra": 1})
        + "\n\n"
        + json.dumps({"path": absolute, "text": "jsonl c"})
        + "\n"
    )
    code, stdout, err = run(
        capsys,
        tmp_path / "sub" / "pairs.jsonl",
        tmp_path / "jl" / "pairs",
        "--image_column path --caption_column text",
    )
    assert code == 0, err
    assert read_all(tmp_path / "jl") == [(images["b.jpg"], "jsonl b"), (images["c.png"], "jsonl c")]
    assert "wrote 2 records into 1 shard (2 rows read, 0 skipped)" in stdout


def test_image_folder_with_caption_sidecars(tmp_path, capsys):
    root = tmp_path / "photos"
    images = write_images(root, ["a/001.jpg", "a/002.png", "b/c/x.webp", "b/nocaption.jpg"])
    (root / "a" / "001.txt").write_text("first photo\n")
    (root / "a" / "002.txt").write_bytes("\ufeffsecond photo".encode())
    (root / "b" / "c" / "x.txt").write_text("nested webp")
    (root / "README.txt").write_text("not a caption of anything")
    code, _, err = run(capsys, root, tmp_path / "out" / "pairs")
    assert code == 0, err
    assert read_all(tmp_path / "out") == [
        (images["a/001.jpg"], "first photo"),
        (images["a/002.png"], "second photo"),
        (images["b/c/x.webp"], "nested webp"),
    ]
    assert skip_counts(err) == {"missing_field": 1}
    assert f"{root}/b/nocaption.jpg (no caption file nocaption.txt)" in skip_line(
        err, "missing_field"
    )


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """An uncompressed tar of (member name, bytes), in this order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_webdataset_shards_from_a_brace_range_or_a_glob(tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    jpg, png, webp = (
        image_bytes(10, 7, fmt, seed) for seed, fmt in enumerate(["JPEG", "PNG", "WEBP"])
    )
    (shards / "00000.tar").write_bytes(
        tar_bytes(
            [
                ("000000.jpg", jpg),
                ("000000.txt", b"from txt"),
                ("000000.json", b'{"caption": "ignored"}'),
                ("._000001.png", b"macOS metadata"),
                ("000001.png", png),
                ("000001.json", json.dumps({"caption": "from json caption"}).encode()),
            ]
        )
    )
    (shards / "00001.tar").write_bytes(
        tar_bytes(
            [
                ("dir/000002.webp", webp),
                ("dir/000002.json", b'{"text": "from json text", "w": 10}'),
                ("000003.txt", b"no image"),
                ("000004.jpg", jpg),
                ("000004.json", b"{not json"),
            ]
        )
    )
    expected = [(jpg, "from txt"), (png, "from json caption"), (webp, "from json text")]
    for number, pattern in enumerate([f"{shards}/{{00000..00002}}.tar", f"{shards}/*.tar"]):
        out = tmp_path / f"out{number}"
        code, stdout, err = run(capsys, pattern, out / "pairs")
        assert code == 0, err
        assert read_all(out) == expected
        skipped = {"missing_field": 1, "bad_json": 1}
        if "{" in pattern:  # 00002.tar is absent: one missing shard of a range is counted
            skipped["missing_file"] = 1
        assert skip_counts(err) == skipped
        assert f"{shards}/00001.tar:000003" in skip_line(err, "missing_field")
        assert f"{shards}/00001.tar:000004.json" in skip_line(err, "bad_json")


def test_inputs_and_output_on_a_remote_file_system(capsys):
    """TF's in-memory ram:// file system stands in for gs:// (everything goes through gfile)."""
    root = f"ram://{uuid.uuid4().hex}"
    png, jpg = image_bytes(6, 5), image_bytes(5, 6, "JPEG", seed=1)
    files = {
        "shards/0.tar": tar_bytes([("k.png", png), ("k.txt", b"from the tar")]),
        "photos/top.jpg": jpg,
        "photos/top.txt": b"top level",
        "photos/a/deep.png": png,  # ram:// lists no folders: a file at every depth
        "photos/a/deep.txt": b"one folder down",
    }
    for name, data in files.items():
        with tf.io.gfile.GFile(f"{root}/{name}", "wb") as f:
            f.write(data)
    code, stdout, err = run(capsys, [f"{root}/shards/*.tar", f"{root}/photos"], f"{root}/out/p")
    assert code == 0, err
    assert tf.io.gfile.listdir(f"{root}/out") == ["p-00000-of-00001.tfrecord"]
    assert read_shard(f"{root}/out/p-00000-of-00001.tfrecord") == [
        (png, "from the tar"),
        (png, "one folder down"),
        (jpg, "top level"),
    ]
    assert stdout.rstrip().endswith(f"config: files={root}/out/p-*.tfrecord")


def test_brace_expansion():
    assert expand_braces("s/{00008..00010}.tar") == ["s/00008.tar", "s/00009.tar", "s/00010.tar"]
    assert expand_braces("{a,b}/{8..10}") == ["a/8", "a/9", "a/10", "b/8", "b/9", "b/10"]
    assert expand_braces("plain.tar") == ["plain.tar"]


# ---------------------------------------------------------------------------------------------
# Resizing.


def test_max_side_resizes_large_images_and_keeps_small_ones_byte_for_byte(tmp_path, capsys):
    # (width, height, format) -> size after --max_side 100, worked out by hand.
    cases = {
        "wide.png": ((300, 120, "PNG"), (100, 40)),
        "tall.jpg": ((50, 200, "JPEG"), (25, 100)),
        "odd.png": ((101, 20, "PNG"), (100, 20)),  # 20 * 100 / 101 = 19.8 -> 20
        "square.png": ((90, 90, "PNG"), None),
        "exact.jpg": ((100, 64, "JPEG"), None),
        "scan.tiff": ((40, 30, "TIFF"), (40, 30)),  # tf.io.decode_image cannot read TIFF
    }
    (tmp_path / "img").mkdir()
    originals = {}
    for seed, (name, ((width, height, fmt), _)) in enumerate(cases.items()):
        originals[name] = image_bytes(width, height, fmt, seed)
        (tmp_path / "img" / name).write_bytes(originals[name])
    (tmp_path / "pairs.csv").write_text(
        "image,caption\n" + "".join(f"img/{n},{n}\n" for n in cases)
    )
    code, stdout, err = run(
        capsys,
        tmp_path / "pairs.csv",
        tmp_path / "out" / "pairs",
        "--max_side 100 --jpeg_quality 90",
    )
    assert code == 0, err
    records = {caption: data for data, caption in read_all(tmp_path / "out")}
    assert set(records) == set(cases)
    for name, (_, resized) in cases.items():
        if resized is None:
            assert records[name] == originals[name], name
        else:
            # Decoded as the training pipeline decodes it: [height, width, 3].
            decoded = tf.io.decode_image(records[name], channels=3, expand_animations=False)
            assert decoded.shape == (resized[1], resized[0], 3), name
            assert Image.open(io.BytesIO(records[name])).format == "JPEG", name
    assert "(6 rows read, 0 skipped, 3 resized, 1 re-encoded as JPEG)" in stdout


# ---------------------------------------------------------------------------------------------
# Bad rows.


def test_every_kind_of_bad_row_is_skipped_counted_and_located(tmp_path, capsys):
    images = write_images(tmp_path / "img", ["good0.png", "good1.jpg", "good2.png"])
    (tmp_path / "img" / "garbage.png").write_bytes(b"these bytes are no image")
    (tmp_path / "img" / "truncated.png").write_bytes(image_bytes(40, 40)[:-300])
    (tmp_path / "img" / "a_folder.png").mkdir()
    csv_lines = [
        b"image,caption",
        b"img/good0.png,good zero",  # line 2
        b"img/missing.png,no such file",  # 3
        b"img/good1.jpg,   ",  # 4: empty caption
        b"img/good1.jpg",  # 5: short row
        b"img/good1.jpg,unquoted, comma",  # 6: long row
        b"img/garbage.png,garbage",  # 7
        b"img/truncated.png,truncated",  # 8
        b"img/good1.jpg,caf\xe9 in latin-1",  # 9: not UTF-8
        b",no image path",  # 10
        b"img/a_folder.png,a directory",  # 11
        b"",
        b"img/good1.jpg,good one",  # 13 (after a blank line)
    ]
    (tmp_path / "pairs.csv").write_bytes(b"\n".join(csv_lines) + b"\n")
    jsonl_lines = [
        json.dumps({"image": "img/good2.png", "caption": "good two"}).encode(),  # 1
        b'{"image": "img/good2.png", "caption": ',  # 2: malformed
        json.dumps({"image": "img/good2.png"}).encode(),  # 3: no caption
        b'["img/good2.png", "a list"]',  # 4: not an object
        b'{"image": "img/good2.png", "caption": "\xff\xfe"}',  # 5: not UTF-8
        json.dumps({"image": "img/good2.png", "caption": 7}).encode(),  # 6: not text
        json.dumps({"image": "img/good2.png", "caption": ""}).encode(),  # 7: empty
    ]
    (tmp_path / "more.jsonl").write_bytes(b"\n".join(jsonl_lines) + b"\n")
    out = tmp_path / "out"
    code, stdout, err = run(
        capsys, [tmp_path / "pairs.csv", tmp_path / "more.jsonl"], out / "pairs"
    )
    assert code == 0, err
    assert read_all(out) == [
        (images["good0.png"], "good zero"),
        (images["good1.jpg"], "good one"),
        (images["good2.png"], "good two"),
    ]
    csv, jsonl = tmp_path / "pairs.csv", tmp_path / "more.jsonl"
    where = {
        "missing_image": [f"{csv}:3"],
        "empty_caption": [f"{csv}:4", f"{jsonl}:7"],
        "short_row": [f"{csv}:5"],
        "long_row": [f"{csv}:6"],
        "undecodable_image": [f"{csv}:7", f"{csv}:8"],
        "not_utf8": [f"{csv}:9", f"{jsonl}:5"],
        "missing_field": [f"{csv}:10", f"{jsonl}:3"],
        "unreadable_image": [f"{csv}:11"],
        "bad_json": [f"{jsonl}:2", f"{jsonl}:4"],
        "not_text": [f"{jsonl}:6"],
    }
    assert skip_counts(err) == {reason: len(places) for reason, places in where.items()}
    for reason, places in where.items():
        line = skip_line(err, reason)
        found = re.findall(r"(/\S+:\d+)\b", line)
        assert found == places, (reason, line)
    assert "skipped 15 of 18 rows:" in err
    assert "(18 rows read, 15 skipped)" in stdout


def test_examples_are_capped_per_reason(tmp_path, capsys):
    (tmp_path / "pairs.csv").write_text(
        "image,caption\nok.png,fine\n" + "".join(f"gone{i}.png,x\n" for i in range(6))
    )
    (tmp_path / "ok.png").write_bytes(image_bytes(4, 4))
    code, _, err = run(capsys, tmp_path / "pairs.csv", tmp_path / "o")
    assert code == 0
    line = skip_line(err, "missing_image")
    assert line.startswith("  missing_image: 6 (image file not found), e.g. ")
    assert re.findall(r"pairs\.csv:(\d+)", line) == ["3", "4", "5"]


def test_nothing_usable_exits_1_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "pairs.csv").write_text("image,caption\nmissing.png,lost\nalso.png,lost\n")
    out = tmp_path / "out"
    code, stdout, err = run(capsys, tmp_path / "pairs.csv", out / "p")
    assert code == 1 and stdout == ""
    assert f"error: nothing usable in {tmp_path}/pairs.csv (all 2 skipped)" in err
    assert "missing_image: 2" in err
    assert not out.exists() or list(out.iterdir()) == []

    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, tmp_path / "empty", out / "p")
    assert code == 1 and "(no rows found)" in err

    code, _, err = run(capsys, tmp_path / "pairs.csv", out / "p", "--caption_column text")
    assert code == 1
    assert (
        "no column 'text' in the header ['image', 'caption']" in err and "--caption_column" in err
    )

    (tmp_path / "pairs.parquet").write_bytes(b"PAR1")
    code, _, err = run(capsys, tmp_path / "pairs.parquet", out / "p")
    assert code == 1 and "cannot tell the format" in err and "--format" in err
    code, _, err = run(capsys, tmp_path / "nowhere", out / "p")
    assert code == 1 and "no such file or folder" in err
    assert not out.exists() or list(out.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Shards appear whole or not at all.


class FailingWriter:
    """tf.io.TFRecordWriter that lists the output folder at the 3rd record, then raises."""

    real = tf.io.TFRecordWriter
    writes = 0
    listing: list[str] = []
    error: type[BaseException] = OSError

    def __init__(self, path):
        self.folder = os.path.dirname(path)
        self.inner = self.real(path)

    def write(self, record):
        FailingWriter.writes += 1
        if FailingWriter.writes == 3:
            self.inner.flush()
            FailingWriter.listing = sorted(os.listdir(self.folder))
            raise self.error("disk full")
        self.inner.write(record)

    def close(self):
        self.inner.close()


@pytest.mark.parametrize("error", [OSError, KeyboardInterrupt])
def test_a_failure_mid_write_leaves_no_final_named_shard(tmp_path, capsys, monkeypatch, error):
    write_images(tmp_path, [f"{i}.png" for i in range(6)])
    (tmp_path / "pairs.csv").write_text(
        "image,caption\n" + "".join(f"{i}.png,c {i}\n" for i in range(6))
    )
    monkeypatch.setattr(FailingWriter, "writes", 0)
    monkeypatch.setattr(FailingWriter, "error", error)
    monkeypatch.setattr(tf.io, "TFRecordWriter", FailingWriter)
    out = tmp_path / "out"
    if error is KeyboardInterrupt:
        with pytest.raises(KeyboardInterrupt):
            run(capsys, tmp_path / "pairs.csv", out / "pairs", "--num_shards 2")
    else:
        code, stdout, err = run(capsys, tmp_path / "pairs.csv", out / "pairs", "--num_shards 2")
        assert code == 1 and stdout == ""
        assert "error: disk full" in err and "no shard was written" in err
    # What a crash at that moment would have left: only temporary names, which the training
    # glob does not match.
    suffix = f".tmp-{os.getpid()}"
    assert FailingWriter.listing == [f"pairs-0000{i}-of-00002.tfrecord{suffix}" for i in range(2)]
    assert not tf.io.gfile.glob(f"{out}/pairs-*.tfrecord")
    assert os.listdir(out) == []  # and the temporary files are removed


def test_older_shards_matching_the_glob_are_reported(tmp_path, capsys):
    write_images(tmp_path, ["a.png"])
    (tmp_path / "pairs.csv").write_text("image,caption\na.png,one\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "pairs-00000-of-00003.tfrecord").write_bytes(b"")
    code, stdout, err = run(capsys, tmp_path / "pairs.csv", tmp_path / "out" / "pairs")
    assert code == 0
    assert "warning: 1 older files also match" in err
    assert stdout.rstrip().endswith(f"config: files={tmp_path}/out/pairs-*-of-00001.tfrecord")


# ---------------------------------------------------------------------------------------------
# Terminal behaviour.


def test_progress_lines_in_a_log_and_in_place_on_a_terminal(tmp_path, capsys):
    write_images(tmp_path, [f"{i}.png" for i in range(5)])
    (tmp_path / "pairs.csv").write_text(
        "image,caption\n" + "".join(f"{i}.png,c\n" for i in range(5))
    )
    code, _, err = run(
        capsys, tmp_path / "pairs.csv", tmp_path / "o", "--progress_every 2", quiet=False
    )
    assert code == 0
    progress = [line for line in err.splitlines() if "rows read" in line]
    assert [line.split(" rows/s")[0].rsplit(" (", 1)[0] for line in progress] == [
        "2 rows read, 2 written, 0 skipped",
        "4 rows read, 4 written, 0 skipped",
        "5 rows read, 5 written, 0 skipped",
    ]
    code, _, err = run(capsys, tmp_path / "pairs.csv", tmp_path / "o")
    assert code == 0 and "rows read" not in err  # run() adds --quiet

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    class Report:
        written, num_skipped = 0, 0

        def __init__(self, rows_read):
            self.rows_read = rows_read

    now = [0.0]
    terminal = Terminal()
    progress = make_tfrecords.Progress(terminal, every=1000, clock=lambda: now[0])
    for rows, when in [(1, 0.5), (2, 0.6), (3, 1.0)]:  # the second comes too soon to redraw
        now[0] = when
        progress.update(Report(rows))
    progress.finish(Report(3))
    text = terminal.getvalue()
    assert text.count("\r") == 2 and text.endswith("\x1b[K\n")
    assert "\r1 rows read, 0 written, 0 skipped (2.0 rows/s)\x1b[K" in text
    assert "\r3 rows read, 0 written, 0 skipped (3.0 rows/s)\x1b[K" in text


def test_help_is_fast_and_imports_no_tensorflow():
    code = (
        "import sys, time\n"
        "start = time.perf_counter()\n"
        "from scripts import make_tfrecords\n"
        "try:\n"
        "    make_tfrecords.main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ('tensorflow', 'PIL', 'jax', 'data.convert')\n"
        "heavy = sorted(m for m in heavy if m in sys.modules)\n"
        "print(heavy, time.perf_counter() - start, file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "folder" in result.stdout and "a/001.jpg + a/001.txt" in result.stdout
    heavy, seconds = result.stderr.strip().rsplit(" ", 1)
    assert heavy == "[]"
    assert float(seconds) < 2.0
