"""HellaSwag scoring (jaxgpt/hellaswag.py) on hand-made examples: the batched, bucketed program picks what a
row-by-row computation picks, a tie goes to the first ending, an example longer than the block is refused
and counted; the file reader and eval.py's flag. (Parity against torch and transformers: parity/hf_checks.py.)"""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from jaxgpt import hellaswag
from jaxgpt.errors import UserError
from jaxgpt.tokenizer import ByteTokenizer

RAW = [
    {"ctx": "the king and", "endings": ["the queen", "my lord", "thou art", "what is"], "label": 0},
    {"ctx": "my lord", "endings": ["is", "is", "is", "is"], "label": 2},  # a four-way tie: the first ending wins
    {"ctx": "what", "endings": ["is the king", "art thou", "of thee and my lord", "to"], "label": 3},
    {"ctx": "x" * 40, "endings": ["a", "b", "c", "d"], "label": 1},  # 41 tokens: longer than the block of 32
    {"ctx": "thee", "endings": ["and the queen", "king", "of my lord", "the"], "label": 1},
]


def reference(model, ex: hellaswag.Example) -> tuple[int, int]:
    """One row at a time, unpadded: log-softmax of the full forward at each ending token."""
    sums, means = [], []
    for end in ex.endings:
        row = np.array([ex.context + end])
        logp = np.asarray(jax.nn.log_softmax(model(row[:, :-1]), axis=-1))[0]
        n = len(ex.context)
        nll = [-logp[t - 1, row[0, t]] for t in range(n, n + len(end))]
        sums.append(np.sum(nll))
        means.append(np.mean(nll))
    return int(np.argmin(sums)), int(np.argmin(means))


def test_choices_equal_a_row_by_row_computation_with_a_tie_and_an_overlong_example(tiny_model):
    examples = hellaswag.encode(RAW, ByteTokenizer())
    assert examples[0].endings[0][:1] == [ord(" ")], "each ending is scored with its leading space"
    result = hellaswag.score(tiny_model, examples, batch_size=3)  # two batches, the second short
    fits = [ex for ex in examples if ex.longest <= tiny_model.config.block_size]
    assert result.refused == 1 and result.examples == len(fits) == 4
    assert result.choices == [reference(tiny_model, ex) for ex in fits]
    assert result.choices[1] == (0, 0), "a tie goes to the first ending"
    labels = np.array([ex.label for ex in fits])
    assert result.acc == np.mean(np.array([c[0] for c in result.choices]) == labels)
    assert result.acc_norm == np.mean(np.array([c[1] for c in result.choices]) == labels)


def test_every_example_too_long_is_one_error_line(tiny_model):
    with pytest.raises(UserError, match="all 1 HellaSwag examples are longer than the model's block_size of 32"):
        hellaswag.score(tiny_model, hellaswag.encode(RAW[3:4], ByteTokenizer()))


def test_the_reader_names_a_malformed_line_and_a_missing_download_says_what_to_do(tmp_path, monkeypatch):
    good = tmp_path / "val.jsonl"
    good.write_text("\n".join(json.dumps(d) for d in RAW) + "\n")
    assert hellaswag.read(str(good)) == RAW
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RAW[0]) + "\n" + json.dumps({"ctx": "a", "endings": ["b"], "label": 0}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:2 is not a HellaSwag example"):
        hellaswag.read(str(bad))
    monkeypatch.setattr(hellaswag, "URL", "http://127.0.0.1:9/hellaswag_val.jsonl")  # nothing listens there
    with pytest.raises(UserError, match="cannot download HellaSwag .* pass the file: --hellaswag"):
        hellaswag.fetch(tmp_path / "cache")
    assert not (tmp_path / "cache" / "hellaswag_val.jsonl").exists()


@pytest.mark.slow
def test_eval_prints_hellaswag_alone_or_beside_the_split(tiny_model, tmp_path):
    from formats.io import save_hf
    from tests.launch import cli

    save_hf(tiny_model, tmp_path / "hf", {"tokenizer": ByteTokenizer()})
    (tmp_path / "val.jsonl").write_text("\n".join(json.dumps(d) for d in RAW) + "\n")
    (tmp_path / "text.txt").write_text("the king and the queen of my lord " * 20)
    alone = json.loads(cli("eval", str(tmp_path / "hf"), "--hellaswag=val.jsonl", "--json", cwd=tmp_path).stdout)
    assert set(alone) == {"checkpoint", "step", "hellaswag"}
    assert alone["hellaswag"]["examples"] == 4 and alone["hellaswag"]["refused"] == 1
    both = json.loads(cli("eval", str(tmp_path / "hf"), "--hellaswag=val.jsonl", "--text=text.txt", "--json",
                          cwd=tmp_path).stdout)
    assert both["hellaswag"] == alone["hellaswag"] and both["loss"] > 0


def test_a_run_shows_hellaswag_and_a_sample_at_their_intervals_as_eval_scores_its_checkpoint(tiny_cfg, tmp_path):
    """--hellaswag_interval / --sample_interval: the scores land in the step's metrics record (the last one equals
    scoring the saved checkpoint afterwards) and the sample is text; a bad file stops the run before step 1."""
    from formats.io import load_any
    from jaxgpt import TrainConfig
    from jaxgpt.data import prepare_text
    from jaxgpt.train import train
    from parity.rows import synthetic_corpus

    prepare_text(synthetic_corpus(20_000).astype(np.uint8).tobytes(), tmp_path / "data" / "synth", "synthetic")
    (tmp_path / "val.jsonl").write_text("\n".join(json.dumps(d) for d in RAW) + "\n")
    tc = TrainConfig(dataset="synth", data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "run"), batch_size=4,
                     max_iters=4, eval_interval=4, eval_iters=1, progress=False, plot=False, hellaswag_interval=2,
                     hellaswag_file=str(tmp_path / "val.jsonl"), sample_interval=3, sample_prompt="the ")
    train(tiny_cfg, tc)
    rows = {r["step"]: r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())}
    assert [s for s in rows if "hellaswag_acc" in rows[s]] == [2, 4] and [s for s in rows if "sample" in rows[s]] == [3]
    assert isinstance(rows[3]["sample"], str) and rows[3]["sample"]
    model, _ = load_any(str(tmp_path / "run"), which="latest")
    again = hellaswag.score(model, hellaswag.encode(RAW, ByteTokenizer()))
    assert (rows[4]["hellaswag_acc"], rows[4]["hellaswag_acc_norm"]) == (again.acc, again.acc_norm)
    with pytest.raises(UserError, match="cannot read HellaSwag file"):
        train(tiny_cfg, TrainConfig(**{**tc.to_dict(), "out_dir": str(tmp_path / "bad"),
                                       "hellaswag_file": str(tmp_path / "absent.jsonl")}))
    assert not list((tmp_path / "bad").glob("checkpoints/[0-9]*")), "no step was trained or saved"
