import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from jaxgpt import UserError
from jaxgpt.data import _stories_from_txt, prepare_shakespeare, prepare_text, prepare_tinystories
from jaxgpt.loader import BatchSampler, dataset_dir
from jaxgpt.tokenizer import EOT_BYTE

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40).encode()


def test_prepare_text_splits_90_10_and_is_idempotent(tmp_path):
    meta = prepare_text(TEXT, tmp_path / "ds", "mem")
    train = np.fromfile(tmp_path / "ds" / "train.bin", np.uint8)
    val = np.fromfile(tmp_path / "ds" / "val.bin", np.uint8)
    assert len(train) == int(len(TEXT) * 0.9) and len(train) + len(val) == len(TEXT)
    assert bytes(train) + bytes(val) == TEXT
    assert json.loads((tmp_path / "ds" / "meta.json").read_text())["sha256"] == meta["sha256"]
    mtime = (tmp_path / "ds" / "train.bin").stat().st_mtime_ns
    assert prepare_text(TEXT, tmp_path / "ds", "mem").get("unchanged")
    assert (tmp_path / "ds" / "train.bin").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("raw, match", [(b"\xff\xfe bad", "not UTF-8"), (b"", "empty")])
def test_prepare_text_refuses_bad_input_and_writes_nothing(tmp_path, raw, match):
    with pytest.raises(UserError, match=match):
        prepare_text(raw, tmp_path / "ds", "bad.txt")
    assert not (tmp_path / "ds").exists() or not any((tmp_path / "ds").iterdir())


def test_txt_story_stream_handles_separators_across_chunks(tmp_path):
    path = tmp_path / "s.txt"
    stories = ["Once upon a time.", "A cat sat. 🐱", "The end."]
    path.write_text("<|endoftext|>".join(stories))
    assert [s.strip() for s in _stories_from_txt(path, chunk_bytes=5)] == stories


def test_prepare_tinystories_encodes_story_boundaries(tmp_path):
    train, valid = tmp_path / "TinyStories-train.txt", tmp_path / "TinyStories-valid.txt"
    train.write_text("\n<|endoftext|>\n".join(f"Story {i}." for i in range(10)))
    valid.write_text("One.<|endoftext|>Two.")
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text("\n".join(json.dumps({"story": f"Json {i}."}) for i in range(3)))
    meta = prepare_tinystories(tmp_path / "data", [str(train), str(valid), str(jsonl)])
    assert meta["train_stories"] == 13 and meta["val_stories"] == 2
    data = np.fromfile(tmp_path / "data" / "tinystories" / "train.bin", np.uint8)
    assert (data == EOT_BYTE).sum() == 13 and data[-1] == EOT_BYTE
    assert bytes(data[: data.tolist().index(EOT_BYTE)]) == b"Story 0."


def test_missing_dataset_names_the_prepare_command(tmp_path):
    with pytest.raises(UserError, match="python scripts/prepare.py shakespeare"):
        dataset_dir(tmp_path, "shakespeare")


@pytest.fixture()
def train_bin(tmp_path):
    prepare_text(TEXT, tmp_path / "ds", "mem")
    return tmp_path / "ds" / "train.bin"


def test_batches_are_shifted_windows_reproducible_from_seed(train_bin):
    data = np.fromfile(train_bin, np.uint8)
    s = BatchSampler(train_bin, block_size=16, batch_size=4, seed=1, accum=2)
    x, y = s.get(5)
    assert x.shape == y.shape == (2, 4, 16) and x.dtype == np.int32
    np.testing.assert_array_equal(x[..., 1:], y[..., :-1])
    for start, row in zip(s.offsets(5).reshape(-1), x.reshape(-1, 16), strict=True):
        np.testing.assert_array_equal(row, data[start:start + 16])
    np.testing.assert_array_equal(BatchSampler(train_bin, 16, 4, seed=1, accum=2).get(5)[0], x)
    assert not np.array_equal(s.get(6)[0], x)
    assert not np.array_equal(BatchSampler(train_bin, 16, 4, seed=2, accum=2).get(5)[0], x)


def test_processes_take_disjoint_rows_of_the_same_global_batch(train_bin):
    full = BatchSampler(train_bin, 16, 8, seed=3).get(2)[0]
    parts = [BatchSampler(train_bin, 16, 8, seed=3, rows=slice(2 * p, 2 * p + 2)).get(2)[0] for p in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), full)


def test_data_smaller_than_one_block_is_refused(train_bin):
    with pytest.raises(UserError, match="fewer than one block"):
        BatchSampler(train_bin, block_size=10_000, batch_size=2, seed=0)


SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def test_real_tiny_shakespeare_splits_like_nanogpt(tmp_path):
    if not SHAKESPEARE.is_file():
        pytest.skip(f"Tiny Shakespeare not found at {SHAKESPEARE} (the ../shared checkout is absent)")
    meta = prepare_shakespeare(tmp_path, str(SHAKESPEARE))
    assert (meta["train_tokens"], meta["val_tokens"]) == (1_003_854, 111_540)  # SOURCE.md's reference split
    assert hashlib.md5(SHAKESPEARE.read_bytes()).hexdigest() == "6fb458f1232090904fb40fe944165e91"
