"""--data from a `datasets` dataset: field mapping, batched tokenisation equal to the file path's
row rules, and clear errors. Offline: the dataset is a local directory of JSON-lines files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtp_torch.training.data import encode_row
from mtp_torch.training.sources import (
    load_dataset_examples,
    parse_field_mapping,
    tokenize_rows,
)
from tests.synthetic import make_tokenizer

ROWS = [
    {"text": "hello world"},
    {"text": ""},
    {
        "messages": [
            {"role": "user", "content": "what is two"},
            {"role": "assistant", "content": "a"},
        ]
    },
    {"question": "what is two plus three", "answer": "five"},
    {"text": "a b c <eos>"},
]


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("batch_size", [1, 2, 256])
def test_batched_tokenisation_equals_one_row_at_a_time(chat: bool, batch_size: int) -> None:
    tokenizer = make_tokenizer(chat=chat)
    rows = ROWS if chat else [r for r in ROWS if "messages" not in r]
    expected = [encode_row(row, tokenizer) for row in rows]  # one tokenizer call per row
    assert list(tokenize_rows(rows, tokenizer, batch_size)) == expected


def _dataset_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "metamath-like"
    folder.mkdir(parents=True)
    rows = [
        {"query": f"what is {w}", "response": "five", "type": "x"} for w in ("two", "three", "a")
    ]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


def test_a_dataset_with_other_column_names_is_read_through_the_mapping(tmp_path: Path) -> None:
    tokenizer = make_tokenizer()
    fields = parse_field_mapping("question=query,answer=response")
    sequences = load_dataset_examples(str(_dataset_dir(tmp_path)), tokenizer, fields=fields)
    expected = encode_row({"question": "what is two", "answer": "five"}, tokenizer)
    assert len(sequences) == 3 and sequences[0] == expected
    assert (
        len(
            load_dataset_examples(
                str(_dataset_dir(tmp_path / "b")), tokenizer, fields=fields, limit=2
            )
        )
        == 2
    )


def test_missing_columns_and_bad_mappings_say_what_to_fix(tmp_path: Path) -> None:
    tokenizer = make_tokenizer()
    with pytest.raises(ValueError, match="no column.*'prompt'.*--data-fields"):
        load_dataset_examples(str(_dataset_dir(tmp_path)), tokenizer, fields={"question": "prompt"})
    with pytest.raises(ValueError, match="ROW_FIELD=COLUMN"):
        parse_field_mapping("question")
    with pytest.raises(ValueError, match="unknown row field"):
        parse_field_mapping("prompt=query")
    with pytest.raises(ValueError, match="needs a"):
        load_dataset_examples(
            str(_dataset_dir(tmp_path / "c")), tokenizer
        )  # no mapping: no row shape


def test_convert_trains_on_a_dataset_named_by_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`mtp convert --data ID --data-fields ...`: the datasets path end to end (a local dataset
    directory stands in for a Hub id, offline)."""
    from mtp_torch.cli.app import main as cli_main
    from tests.test_distill import _tiny_model_dir

    dataset = _dataset_dir(tmp_path)
    argv = [
        "convert", "--model", str(_tiny_model_dir(tmp_path)), "--data", str(dataset),
        "--data-fields", "question=query,answer=response", "--data-split", "train",
        "--out", str(tmp_path / "out"), "--steps", "1", "--k-max", "2", "--seq-len", "16",
        "--batch-size", "2", "--no-progress",
    ]  # fmt: skip
    assert cli_main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 1
    card = (tmp_path / "out" / "README.md").read_text()  # the model card names data and run
    assert "metamath-like (train), 3 rows" in card and "## Training" in card
    bad = [("question=prompt" if a == "question=query,answer=response" else a) for a in argv]
    assert cli_main([*bad, "--overwrite"]) == 2
    assert "no column(s) ['prompt']" in capsys.readouterr().err
