"""The plain process-pool prepare that `bench.py --sections=data` measures jaxgpt's against: build-nanogpt's
fineweb.py shape (Pool(n).imap(tokenize, documents, chunksize=16), a document's ids after an end-of-text id,
uint16 shards of 100 M tokens with llm.c's header), reading the same files with the same tokenizer.

  python benchmarks/baseline.py TOKENIZER_JSON OUT_DIR WORKERS FILE [FILE ...]
"""
import gzip
import io
import json
import multiprocessing as mp
import os
import sys

import numpy as np

SHARD = 100_000_000
tok = None


def init(path: str) -> None:
    global tok
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(path)


def tokenize(doc: str) -> np.ndarray:
    eot = tok.token_to_id("<|endoftext|>")
    return np.array([eot] + tok.encode(doc, add_special_tokens=False).ids, dtype=np.uint16)


def documents(files: list[str]):
    for path in files:
        if path.endswith(".txt"):
            with open(path, encoding="utf-8") as f:
                yield f.read()
        elif path.endswith(".parquet"):
            import pyarrow.parquet as pq
            for batch in pq.ParquetFile(path).iter_batches(columns=["text"]):
                yield from batch.column(0).to_pylist()
        else:
            if path.endswith(".gz"):
                f = gzip.open(path, "rb")
            elif path.endswith(".zst"):
                import zstandard
                f = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))
            else:
                f = open(path, "rb")
            with f:
                for line in f:
                    yield json.loads(line)["text"]


def write(path: str, tokens: np.ndarray) -> None:
    header = np.zeros(256, np.int32)
    header[0], header[1], header[2] = 20240520, 1, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.tobytes())


if __name__ == "__main__":
    tokenizer, out, workers, files = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    os.makedirs(out, exist_ok=True)
    buf, count, index = np.empty(SHARD, np.uint16), 0, 0
    with mp.Pool(workers, initializer=init, initargs=(tokenizer,)) as pool:
        for tokens in pool.imap(tokenize, documents(files), chunksize=16):
            while len(tokens):
                take = min(len(tokens), SHARD - count)
                buf[count:count + take] = tokens[:take]
                count, tokens = count + take, tokens[take:]
                if count == SHARD:
                    write(os.path.join(out, f"shard_{index:06d}.bin"), buf)
                    count, index = 0, index + 1
    if count:
        write(os.path.join(out, f"shard_{index:06d}.bin"), buf[:count])
