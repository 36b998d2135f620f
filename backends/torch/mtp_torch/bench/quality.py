"""Quality metrics of the benchmark, as pure functions over token ids, text and numbers.

- GSM8K grading: ``extract_final_number`` reads a model's final answer, ``gsm8k_reference``
  the dataset's, ``answers_match`` compares them; ``grade_answers`` counts a method's hits.
- Agreement with a reference decoding (the greedy baseline): ``common_prefix_length``,
  ``token_f1`` and, averaged over prompts, ``agreement``.
- Teacher likelihood: ``mean_teacher_nll`` turns per-prompt sums of negative log-likelihood
  into the mean per generated token (the sums themselves come from
  ``mtp_torch.bench.measure.teacher_nll``, which runs the teacher).

Nothing here imports torch.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

import attrs
import numpy as np

__all__ = [
    "Agreement",
    "TeacherNLL",
    "agreement",
    "answers_match",
    "common_prefix_length",
    "extract_final_number",
    "grade_answers",
    "gsm8k_reference",
    "mean",
    "mean_teacher_nll",
    "token_f1",
]

_NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\$?\s?\.\d+")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANSWER_PHRASE = re.compile(
    r"(?:final answer|the answer|answer)\s*(?:is|:|=)?\s*[:=]?", flags=re.IGNORECASE
)


# --- GSM8K answers -----------------------------------------------------------------------------


def _normalise_number(raw: str) -> str | None:
    """``"$1,234.50"`` -> ``"1234.5"``; ``"18.00"`` -> ``"18"``; ``None`` if not a number."""
    cleaned = raw.replace("$", "").replace(",", "").replace(" ", "").strip().rstrip(".")
    if not cleaned or cleaned in {"-", "."}:
        return None
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _numbers(text: str) -> list[str]:
    """Every number in ``text``, normalised, in order."""
    found = []
    for match in _NUMBER.finditer(text):
        number = _normalise_number(match.group(0))
        if number is not None:
            found.append(number)
    return found


def extract_final_number(text: str) -> str | None:
    """The final numeric answer of a model's (chain-of-thought) response, normalised.

    Looks, in order, for the number after the last ``####``, inside the last ``\\boxed{...}``,
    after the last "answer is" / "answer:" phrase, and finally takes the last number in the
    text.  Currency signs, thousands separators and trailing zeros are dropped.

    Args:
      text: the decoded response.

    Returns:
      The number as a canonical string (``"18"``, ``"-2.5"``), or ``None`` if there is none.

    Example:
      >>> extract_final_number("She makes 9 * 2 = $18 a day.\\n#### 18")
      '18'
      >>> extract_final_number("The answer is $1,234.00.")
      '1234'
    """
    if "####" in text:
        numbers = _numbers(text.rsplit("####", 1)[1])
        if numbers:
            return numbers[0]
    boxed = _BOXED.findall(text)
    if boxed:
        numbers = _numbers(boxed[-1])
        if numbers:
            return numbers[-1]
    phrases = list(_ANSWER_PHRASE.finditer(text))
    if phrases:
        numbers = _numbers(text[phrases[-1].end() :])
        if numbers:
            return numbers[0]
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


def gsm8k_reference(answer: object) -> str | None:
    """The normalised reference number of a GSM8K ``answer`` field.

    Args:
      answer: the dataset's answer text (reasoning, then ``#### number``), or a bare number.

    Returns:
      The number as a canonical string, or ``None`` if the answer holds no ``####`` line and is
      not a number itself.
    """
    if isinstance(answer, bool):
        return None
    if isinstance(answer, (int, float)):
        return _normalise_number(repr(answer)) if math.isfinite(answer) else None
    if not isinstance(answer, str):
        return None
    if "####" in answer:
        numbers = _numbers(answer.rsplit("####", 1)[1])
        return numbers[0] if numbers else None
    return _normalise_number(answer)


def answers_match(predicted: str | None, reference: str | None) -> bool:
    """True when two normalised numbers are equal (within 1e-6 relative)."""
    if predicted is None or reference is None:
        return False
    try:
        a, b = float(predicted), float(reference)
    except ValueError:
        return predicted == reference
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def grade_answers(responses: Sequence[str], references: Sequence[str]) -> int:
    """How many responses end in the reference number (``extract_final_number``).

    Args:
      responses: decoded responses of the graded prompts.
      references: their normalised reference numbers (``gsm8k_reference``), same order.

    Returns:
      The number of correct responses.
    """
    correct = 0
    for response, reference in zip(responses, references, strict=True):
        correct += int(answers_match(extract_final_number(response), reference))
    return correct


# --- agreement with a reference decoding --------------------------------------------------------


def common_prefix_length(tokens: Sequence[int], reference: Sequence[int]) -> int:
    """Number of leading tokens two sequences share.

    Example:
      >>> common_prefix_length([1, 2, 3, 9], [1, 2, 3, 4, 5])
      3
    """
    length = 0
    for a, b in zip(tokens, reference, strict=False):
        if int(a) != int(b):
            break
        length += 1
    return length


def token_f1(tokens: Sequence[int], reference: Sequence[int]) -> float:
    """Bag-of-tokens F1 between a generated sequence and a reference sequence.

    Precision and recall count overlapping tokens with multiplicity (order ignored).  Two empty
    sequences score 1; one empty sequence scores 0.

    Example:
      >>> token_f1([1, 2, 2, 3], [2, 1, 4, 2])
      0.75
    """
    if len(tokens) == 0 and len(reference) == 0:
        return 1.0
    if len(tokens) == 0 or len(reference) == 0:
        return 0.0
    overlap = sum((Counter(int(t) for t in tokens) & Counter(int(t) for t in reference)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(tokens)
    recall = overlap / len(reference)
    return 2.0 * precision * recall / (precision + recall)


def mean(values: Sequence[float]) -> float | None:
    """The arithmetic mean (numpy's), or ``None`` for no values."""
    return float(np.mean(values)) if len(values) else None


@attrs.frozen
class Agreement:
    """Agreement of a method's outputs with reference outputs, averaged over prompts.

    Attributes:
      prefix: mean common-prefix length in tokens.
      prefix_fraction: mean common-prefix length over the reference's length (1 for an empty
        reference).
      exact_match: fraction of prompts whose output equals the reference exactly.
      token_f1: mean bag-of-tokens F1.

    Every field is ``None`` when there are no prompts.
    """

    prefix: float | None
    prefix_fraction: float | None
    exact_match: float | None
    token_f1: float | None


def agreement(generated: Sequence[Sequence[int]], references: Sequence[Sequence[int]]) -> Agreement:
    """Compare each prompt's generated ids with the reference ids of the same prompt.

    Args:
      generated: generated token ids per prompt (prompt excluded, cut at the stop token).
      references: the reference decoding's ids per prompt, same order and length.

    Returns:
      The ``Agreement`` averages.

    Example:
      >>> agreement([[1, 2, 3], [4]], [[1, 2, 9], [4]]).prefix
      1.5
    """
    prefixes, fractions, f1s, exact = [], [], [], []
    for tokens, reference in zip(generated, references, strict=True):
        prefix = common_prefix_length(tokens, reference)
        prefixes.append(prefix)
        fractions.append(prefix / len(reference) if reference else 1.0)
        f1s.append(token_f1(tokens, reference))
        exact.append(float(list(tokens) == list(reference)))
    return Agreement(
        prefix=mean(prefixes),
        prefix_fraction=mean(fractions),
        exact_match=mean(exact),
        token_f1=mean(f1s),
    )


# --- teacher likelihood ------------------------------------------------------------------------


@attrs.frozen
class TeacherNLL:
    """The teacher's negative log-likelihood of one prompt's generated tokens.

    Attributes:
      total: summed negative log-likelihood (nats) over the scored tokens.
      scored: tokens scored.
      skipped: generated tokens outside the teacher's vocabulary, not scored.
    """

    total: float
    scored: int
    skipped: int


def mean_teacher_nll(scores: Sequence[TeacherNLL]) -> tuple[float | None, int]:
    """Mean negative log-likelihood per scored token over prompts, and the skipped count.

    Args:
      scores: one ``TeacherNLL`` per prompt.

    Returns:
      ``(mean_nll, skipped_tokens)``; the mean is ``None`` when no token was scored.

    Example:
      >>> mean_teacher_nll([TeacherNLL(3.0, 2, 0), TeacherNLL(1.0, 2, 1)])
      (1.0, 1)
    """
    total, scored, skipped = 0.0, 0, 0
    for score in scores:  # a plain running sum: the same float as the per-prompt loop it replaced
        total, scored, skipped = total + score.total, scored + score.scored, skipped + score.skipped
    return (total / scored if scored else None), skipped
