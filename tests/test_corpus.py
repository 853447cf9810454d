"""prepare.py text on corpora the tests make: formats, document order, exact ids, the val split, resume,
refusals, tasks, tiktoken; and reading shards back (llm.c's format, epoch order). The 200 MB run with memory,
SIGKILL and training is tests/test_data_scale.py."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.data import train_tokenizer
from jaxgpt import UserError, corpus, shards
from jaxgpt.loader import BatchSampler, open_dataset
from jaxgpt.prepare import CorpusJob, _Out, prepare_corpus
from jaxgpt.tokenizer import EOT_BYTE, HFTokenizer, tiktoken_twin

DOCS = [f"Document {i}: " + " ".join(f"word{j * i % 97}" for j in range(5 + 7 * i)) + ("\n\n  tail" if i % 3 else "")
        for i in range(40)]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json", vocab_size=1024)


def write_inputs(folder: Path) -> list[str]:
    """DOCS spread over every format, in this order: jsonl, jsonl.gz, jsonl.zst, parquet, and a .txt (one document)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    folder.mkdir(parents=True, exist_ok=True)
    lines = lambda docs: "".join(json.dumps({"text": d, "n": 1}) + "\n" for d in docs).encode()  # noqa: E731
    (folder / "a.jsonl").write_bytes(lines(DOCS[:10]) + b"\n")  # a blank line is no document
    (folder / "b.jsonl.gz").write_bytes(gzip.compress(lines(DOCS[10:20])))
    (folder / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines(DOCS[20:30])))
    pq.write_table(pa.table({"text": DOCS[30:39]}), folder / "d.parquet", row_group_size=4)
    (folder / "e.txt").write_text(DOCS[39] * 5)
    return [str(folder / n) for n in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet", "e.txt")]


def expected_ids(encode, eot: int) -> np.ndarray:
    docs = DOCS[:39] + [DOCS[39] * 5]
    return np.concatenate([np.append(encode(d), eot) for d in docs])


def stream(folder: Path, vocab: int) -> np.ndarray:
    ds = open_dataset(str(folder.parent), folder.name, vocab)
    return np.concatenate([ds.stream(s).read(0, ds.stream(s).n_tokens) for s in ("val", "train")])


def job(inputs: list[str], out: Path, **kw) -> CorpusJob:
    return CorpusJob(inputs, str(out), **{"workers": 2, "shard_tokens": 500, "val_tokens": 300, "piece_chars": 64,
                                          "progress": False, **kw})


def test_every_format_in_order_gives_the_tokenizers_own_ids_after_cutting(tmp_path, tok_path):
    inputs = write_inputs(tmp_path / "in")
    tok = HFTokenizer(tok_path)
    eot = tok.tok.token_to_id("<|endoftext|>")
    for encoder in ("tokenizers", "tiktoken"):
        meta = prepare_corpus(job(inputs, tmp_path / f"hf-{encoder}", tokenizer=str(tok_path), encoder=encoder))
        got = stream(tmp_path / f"hf-{encoder}", meta["vocab_size"])
        want = expected_ids(tok.encode, eot)
        assert len(got) == len(want) and np.array_equal(got, want), f"{encoder}: ids differ from tokenizers' own"
    meta = prepare_corpus(job(inputs, tmp_path / "bytes"))
    assert meta["eot_id"] == EOT_BYTE and meta["dtype"] == "uint16"  # llm.c's format has no uint8
    got = stream(tmp_path / "bytes", 256)
    np.testing.assert_array_equal(got, expected_ids(lambda d: np.frombuffer(d.encode(), np.uint8), EOT_BYTE))
    assert all(s["tokens"] == 500 for s in meta["shards"]["train"][:-1])  # shards are exactly --shard_tokens
    assert meta["val_bytes"] + meta["train_bytes"] == sum(len(d.encode()) for d in DOCS[:39]) + len(DOCS[39].encode()) * 5


def test_val_is_the_first_whole_documents_and_a_single_document_is_cut(tmp_path):
    inputs = write_inputs(tmp_path / "in")
    meta = prepare_corpus(job(inputs, tmp_path / "ds"))
    sizes = np.cumsum([len(d.encode()) + 1 for d in DOCS])
    assert meta["val_tokens"] == sizes[sizes <= 300][-1]  # whole documents, up to --val_tokens
    one = tmp_path / "one.txt"
    one.write_text("x y " * 400)
    meta = prepare_corpus(job([str(one)], tmp_path / "single", val_tokens=123))
    assert meta["val_tokens"] == 123 and meta["train_tokens"] == 1600 + 1 - 123
    assert (meta["val_bytes"], meta["train_bytes"]) == (123, 1600 - 123)


def test_bytes_of_a_document_cut_by_the_val_split_add_up(tmp_path, tok_path):
    one = tmp_path / "one.txt"
    one.write_text("Wherefore art thou, Romeo? 東京 " * 300)
    meta = prepare_corpus(job([str(one)], tmp_path / "single", tokenizer=str(tok_path), val_tokens=777))
    assert meta["val_tokens"] == 777 and meta["val_bytes"] + meta["train_bytes"] == len(one.read_bytes())


def test_a_crash_mid_run_resumes_to_identical_shards(tmp_path, tok_path, monkeypatch):
    inputs = write_inputs(tmp_path / "in")
    prepare_corpus(job(inputs, tmp_path / "ref", tokenizer=str(tok_path)))
    published, real = [], _Out.publish

    def crash_after_three(self, tmp, name):
        if len(published) == 3:
            raise RuntimeError("power cut")
        published.append(name)
        real(self, tmp, name)
    monkeypatch.setattr(_Out, "publish", crash_after_three)
    with pytest.raises(RuntimeError, match="power cut"):
        prepare_corpus(job(inputs, tmp_path / "cut", tokenizer=str(tok_path)))
    monkeypatch.setattr(_Out, "publish", real)
    assert not (tmp_path / "cut" / "meta.json").exists()
    prepare_corpus(job(inputs, tmp_path / "cut", tokenizer=str(tok_path)))
    names = sorted(p.name for p in (tmp_path / "ref").glob("*.bin"))
    assert names == sorted(p.name for p in (tmp_path / "cut").glob("*.bin")) and len(names) > 4
    for n in names:
        assert (tmp_path / "ref" / n).read_bytes() == (tmp_path / "cut" / n).read_bytes(), n
    assert not list((tmp_path / "cut").glob(".shard-*"))


def test_a_changed_command_or_input_is_refused_not_mixed_in(tmp_path):
    inputs = write_inputs(tmp_path / "in")
    prepare_corpus(job(inputs, tmp_path / "ds"))
    assert prepare_corpus(job(inputs, tmp_path / "ds")).get("unchanged")
    with pytest.raises(UserError, match="another command or from other input"):
        prepare_corpus(job(inputs, tmp_path / "ds", shard_tokens=700))
    (tmp_path / "ds" / "meta.json").unlink()  # as if unfinished
    Path(inputs[0]).write_text(json.dumps({"text": "changed"}) + "\n")
    with pytest.raises(UserError, match="differs in: inputs"):
        prepare_corpus(job(inputs, tmp_path / "ds"))


@pytest.mark.parametrize("make, match", [
    (lambda p: p.write_bytes(b"\xff\xfe bad"), "not UTF-8"),
    (lambda p: p.write_text(""), "is empty"),
    (lambda p: None, "does not exist"),
])
def test_bad_text_input_is_one_clear_error(tmp_path, make, match):
    path = tmp_path / "in.txt"
    make(path)
    with pytest.raises(UserError, match=match):
        prepare_corpus(job([str(path)], tmp_path / "ds"))


def test_a_damaged_archive_is_one_line_naming_it(tmp_path):
    inputs = write_inputs(tmp_path / "in")
    Path(inputs[1]).write_bytes(Path(inputs[1]).read_bytes()[:40])  # a cut .gz
    with pytest.raises(UserError, match="cannot read .*b.jsonl.gz"):
        prepare_corpus(job(inputs, tmp_path / "ds"))


def test_jsonl_without_the_field_and_unknown_formats_are_refused(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(UserError, match="--text_field"):
        prepare_corpus(job([str(tmp_path / "a.jsonl")], tmp_path / "ds"))
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(UserError, match="not a format"):
        corpus.expand_inputs([str(tmp_path / "a.csv")])
    with pytest.raises(UserError, match="matches no file"):
        corpus.expand_inputs([str(tmp_path / "*.parquet")])


def test_tasks_write_one_dataset_equal_to_a_one_machine_run(tmp_path):
    inputs = write_inputs(tmp_path / "in")
    one = prepare_corpus(job(inputs, tmp_path / "one"))
    outs = [prepare_corpus(job(inputs, tmp_path / "many", task=t, tasks=3)) for t in (2, 0, 1)]
    assert "shards" not in outs[0] and "shards" not in outs[1] and "shards" in outs[2]  # the last one writes meta.json
    assert np.array_equal(stream(tmp_path / "many", 256), stream(tmp_path / "one", 256))
    assert outs[2]["val_tokens"] == one["val_tokens"]
    files = corpus.expand_inputs(inputs)
    busy = {f"train_{t:04d}" for t in range(3) if len(corpus.task_slice(files, t, 3))}
    assert {s["name"][:10] for s in outs[2]["shards"]["train"]} == busy and len(busy) >= 2  # each task's own shards


def test_task_slices_cover_the_files_once_and_balance_bytes():
    inputs = [corpus.Input(f"f{i}.txt", size, "") for i, size in enumerate([5, 100, 1, 1, 50, 50, 3])]
    slices = [corpus.task_slice(inputs, t, 3) for t in range(3)]
    assert [i for s in slices for i in s] == list(range(7))
    assert [len(s) for s in slices] == [2, 3, 2]
    assert [corpus.task_slice(inputs[:1], t, 2) for t in (0, 1)] == [range(1), range(0)]  # more tasks than files


def test_tiktoken_twin_only_where_it_is_exact(tok_path):
    raw = tok_path.read_bytes()
    twin, tok = tiktoken_twin(raw), HFTokenizer(tok_path)
    text = corpus.PROBE + "<|endoftext|> and 'll"
    assert twin is not None and twin.encode(text, allowed_special="all") == tok.encode(text).tolist()
    spec = json.loads(raw)
    spec["normalizer"] = {"type": "Lowercase"}
    assert tiktoken_twin(json.dumps(spec).encode()) is None


def test_cuts_are_exact_for_byte_level_bpe_and_found_out_otherwise(tok_path):
    tok = HFTokenizer(tok_path)
    assert corpus.cuts_are_exact(lambda t: tok.encode(t).tolist())
    assert not corpus.cuts_are_exact(lambda t: [len(t)])  # an encoder that sees across spaces


def test_llmc_shards_read_as_they_are_and_a_wrong_magic_is_one_line(tmp_path):
    folder = tmp_path / "data" / "fineweb10B"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    parts = {n: rng.integers(0, 50257, 3000).astype(np.uint16) for n in
             ("fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin")}
    for name, ids in parts.items():
        (folder / name).write_bytes(shards.header(len(ids), np.dtype("<u2")) + ids.tobytes())
    ds = open_dataset(str(tmp_path / "data"), "fineweb10B", 50304)
    train = ds.stream("train")
    np.testing.assert_array_equal(train.read(2990, 20), np.concatenate(
        [parts["fineweb_train_000001.bin"][2990:], parts["fineweb_train_000002.bin"][:10]]))
    with pytest.raises(UserError, match="--vocab_size"):
        open_dataset(str(tmp_path / "data"), "fineweb10B", None)
    (folder / "fineweb_train_000003.bin").write_bytes(b"\0" * 2048)
    with pytest.raises(UserError, match="not an llm.c token shard"):
        open_dataset(str(tmp_path / "data"), "fineweb10B", 50304)


def test_epoch_order_reads_every_window_once_per_epoch_the_same_on_any_host_count(tmp_path):
    inputs = write_inputs(tmp_path / "in")
    prepare_corpus(job(inputs, tmp_path / "ds"))
    ds = open_dataset(str(tmp_path), "ds")
    block, batch = 16, 4
    sampler = BatchSampler(ds.stream("train"), block, batch, seed=7, order="epoch")
    order = sampler.epochs
    first, second = order.starts(np.arange(order.windows)), order.starts(np.arange(order.windows, 2 * order.windows))
    assert len(set(first.tolist())) == order.windows == sum((s.tokens - 1) // block for s in ds.splits["train"])
    assert set(second.tolist()) == set(first.tolist()) and not np.array_equal(second, first)  # reshuffled
    assert all(int(np.searchsorted(ds.stream("train").starts, i, "right")) ==
               int(np.searchsorted(ds.stream("train").starts, i + block, "right")) for i in first)  # inside one shard
    steps = np.concatenate([sampler.offsets(s).reshape(-1) for s in range(3)])
    np.testing.assert_array_equal(steps, first[:3 * batch])  # step s takes windows s*batch ... of the order
    x, y = sampler.get(3)
    halves = [BatchSampler(ds.stream("train"), block, batch, seed=7, order="epoch", rows=slice(2 * h, 2 * h + 2)).get(3)
              for h in range(2)]
    np.testing.assert_array_equal(np.concatenate([h[0] for h in halves], axis=1), x)
    np.testing.assert_array_equal(x[..., 1:], y[..., :-1])


def test_shard_headers_round_trip_uint16_and_uint32():
    for vocab, version in ((256, 1), (50304, 1), (70_000, 2)):
        dtype = shards.shard_dtype(vocab)
        raw = shards.header(5, dtype) + np.arange(5, dtype=dtype).tobytes()
        assert shards.parse_header(raw, len(raw), "x") == (5, dtype) and int(np.frombuffer(raw[4:8], "<i4")[0]) == version
    with pytest.raises(UserError, match="truncated"):
        shards.parse_header(raw, len(raw) - 1, "x")


def test_val_tokens_limits_what_evaluation_reads(tmp_path):
    inputs = write_inputs(tmp_path / "in")
    prepare_corpus(job(inputs, tmp_path / "ds", val_tokens=2000))
    ds = open_dataset(str(tmp_path), "ds")
    val = BatchSampler(ds.stream("val"), 16, 64, seed=0, split="val", limit=100)
    assert val.n_tokens == 100 and val.offsets(0, stream=1).max() < 100 - 16
    assert len(ds.stream("val").head(100)) == 100 and len(ds.stream("val").head(0)) == ds.stream("val").n_tokens


def test_a_tokenizer_without_end_of_text_concatenates_documents_and_says_so(tmp_path, tok_path, capsys):
    spec = json.loads(tok_path.read_bytes())
    spec["added_tokens"] = []
    spec["model"]["vocab"].pop("<|endoftext|>")
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(spec))
    inputs = write_inputs(tmp_path / "in")
    meta = prepare_corpus(job(inputs[:1], tmp_path / "ds", tokenizer=str(plain)))
    assert meta["eot_id"] is None and "no end-of-text token" in capsys.readouterr().err
    tok = HFTokenizer(plain)
    np.testing.assert_array_equal(stream(tmp_path / "ds", meta["vocab_size"]), np.concatenate([tok.encode(d) for d in DOCS[:10]]))
