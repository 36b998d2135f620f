"""Run the benchmark harness (``mtp bench``) on a tiny checkpoint, offline, in seconds.

``mtp bench`` decodes the same prompts one at a time with transformers' greedy ``generate`` (the
baseline), prompt-lookup decoding, MTP static k, a ConfAdapt threshold sweep and the lossless
mode; it writes a JSON report and a plot and prints a Markdown table of speed and quality side by
side.  Here the checkpoint is a tiny random Llama with a word-level tokenizer, built on the spot,
and the prompts are three GSM8K-style questions, so the numbers mean nothing; the commands are
the ones to run on a real converted model (``mtp bench --model runs/smollm2-mtp``).

Run:  python examples/benchmark_tiny.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mtp_torch import MTPModel
from mtp_torch.cli.app import main as mtp_main

QUESTIONS = [
    ("Tom has 3 bags with 4 apples each . How many apples does Tom have ?", "#### 12"),
    ("A shop sells 5 pens and then 2 more . How many pens are sold ?", "#### 7"),
    ("There are 9 eggs and 3 are eaten . How many eggs are left ?", "#### 6"),
]


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over the questions' words, with a tiny chat template."""
    specials = ["<unk>", "<pad>", "<eos>", "<|user|>", "<|assistant|>"]
    words = sorted({w for question, _ in QUESTIONS for w in question.split()} | set("0123456789"))
    vocab = {token: i for i, token in enumerate([*specials, *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    return tokenizer


def tiny_checkpoint(directory: Path) -> Path:
    """Write a converted (mask token added) tiny Llama checkpoint with its tokenizer."""
    tokenizer = word_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        initializer_range=0.5,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    mtp = MTPModel(LlamaForCausalLM(config).eval(), tokenizer=tokenizer)
    return mtp.save_pretrained(directory / "tiny-mtp", k_max=4, threshold=0.9)


def main() -> None:
    transformers.utils.logging.disable_progress_bar()  # quiet saving/loading
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", default=None, help="write the report here instead of a temp dir")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.keep or scratch)
        work.mkdir(parents=True, exist_ok=True)
        checkpoint = tiny_checkpoint(work)
        data = work / "questions.jsonl"
        data.write_text(
            "".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in QUESTIONS),
            encoding="utf-8",
        )
        # The same options as on the command line: mtp bench --model ... --data ... --out ...
        status = mtp_main(
            [
                "bench",
                "--model",
                str(checkpoint),
                "--data",
                str(data),
                "--out",
                str(work / "report.json"),
                "--max-new-tokens",
                "16",
                "--k-max",
                "4",
                "--thresholds",
                "0.9,0.5",
                "--static",
                "2",
                "--verify-thresholds",
                "0.9",
                "--prompt-lookup-tokens",
                "3",
                "--cost-max-tokens",
                "4",
                "--cost-repeats",
                "1",
                "--device",
                "cpu",
                "--quiet",
            ]
        )
        assert status == 0, f"mtp bench exited with status {status}"
        report = json.loads((work / "report.json").read_text(encoding="utf-8"))
        names = [row["name"] for row in report["methods"]]
        assert names[0] == "greedy" and any(name.startswith("verify_") for name in names)
        lossless = [row for row in report["methods"] if row["family"] == "verify"]
        assert all(row["exact_match"] == 1.0 for row in lossless), "the lossless rows equal greedy"
        print(f"{len(names)} methods benchmarked; report and plot in {work}")


if __name__ == "__main__":
    main()
