"""String rewards: ``exact_match``, ``f1`` (SQuAD-style token F1) and ``multiple_choice``.

``exact_match`` / ``f1`` read ``task["ground_truth"]`` (a string or a list of acceptable strings;
the best match counts). The prediction is the last ``<answer>...</answer>`` block of the response
when there is one, else the whole response. Both sides are normalised as in SQuAD: lower case,
punctuation removed, articles (a, an, the) removed, whitespace collapsed.

``multiple_choice`` reads ``task["answer"]`` (a letter, a 0-based index, or the text of one of
``task["choices"]``) and optionally ``task["choices"]`` (which fixes the valid letters; default
A-E). It extracts the chosen letter from the response (see :func:`extract_choice`).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any

from rllm_core.types import RewardOutput
from rllm_rewards._common import RewardTaskError, action_text, clip, task_value, zero

__all__ = ["exact_match_reward", "extract_choice", "f1_reward", "f1_score", "multiple_choice_reward", "normalize_text"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


def normalize_text(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def f1_score(prediction: str, truth: str) -> float:
    """Token-level F1 between two strings after :func:`normalize_text`."""
    pred, gold = normalize_text(prediction).split(), normalize_text(truth).split()
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def _truths(task: Any, key: str, reward: str) -> list[str]:
    value = task_value(task, key, reward)
    values = list(value) if isinstance(value, list | tuple) else [value]
    if not values or not all(isinstance(v, str | int | float) and not isinstance(v, bool) for v in values):
        raise RewardTaskError(f"reward {reward!r}: task[{key!r}] must be a string or a list of strings, got {value!r}")
    return [str(v) for v in values]


def _prediction(text: str) -> str:
    tags = _ANSWER_TAG.findall(text)
    return tags[-1] if tags else text


def exact_match_reward(task: dict, action: Any, *, answer_key: str = "ground_truth") -> RewardOutput:
    """1.0 when the normalised prediction equals a normalised ground truth, else 0.0."""
    truths = _truths(task, answer_key, "exact_match")
    text, reason = action_text(action)
    if text is None:
        return zero(reason)
    pred = normalize_text(_prediction(text))
    hit = any(pred == normalize_text(t) for t in truths)
    return RewardOutput(reward=float(hit), is_correct=hit, metadata={"prediction": clip(pred)})


def f1_reward(task: dict, action: Any, *, answer_key: str = "ground_truth", threshold: float = 0.5) -> RewardOutput:
    """Reward = best token F1 over the ground truths; ``is_correct`` = F1 >= ``threshold``."""
    truths = _truths(task, answer_key, "f1")
    text, reason = action_text(action)
    if text is None:
        return zero(reason, f1=0.0)
    pred = _prediction(text)
    best = max(f1_score(pred, t) for t in truths)
    return RewardOutput(reward=best, is_correct=best >= threshold, metadata={"f1": best, "prediction": clip(pred)})


# --- multiple choice ---------------------------------------------------------------------------

_DEFAULT_LETTERS = "ABCDE"


def _letters(task: Any, choices_key: str) -> str:
    choices = task.get(choices_key) if isinstance(task, dict) else None
    if choices is None:
        return _DEFAULT_LETTERS
    if not isinstance(choices, list | tuple | dict) or not 1 <= len(choices) <= 26:
        raise RewardTaskError(f"reward 'multiple_choice': task[{choices_key!r}] must be a list of 1-26 choices")
    if isinstance(choices, dict):  # {"A": "...", "B": "..."}
        return "".join(sorted(str(k).upper() for k in choices))
    return string.ascii_uppercase[: len(choices)]


def _choice_texts(task: Any, choices_key: str) -> dict[str, str]:
    choices = task.get(choices_key) if isinstance(task, dict) else None
    if isinstance(choices, dict):
        return {str(k).upper(): str(v) for k, v in choices.items()}
    if isinstance(choices, list | tuple):
        return {string.ascii_uppercase[i]: str(c) for i, c in enumerate(choices)}
    return {}


def extract_choice(text: str, letters: str = _DEFAULT_LETTERS, choices: dict[str, str] | None = None) -> str | None:
    """The letter a response chose, or None.

    In order of trust: ``answer is (B)`` / ``Answer: B`` (last one, any case), ``\\boxed{B}``,
    a lone capital letter in parentheses ``(B)``, a capital letter followed by ``.`` or ``)`` at
    the start of a line, a response that is only the letter, and finally a response that equals the
    text of one choice. Lower-case letters count only after "answer" (to skip the article "a").
    """
    set_ = re.escape(letters)
    patterns = [
        (rf"answer\s*(?:is|:)?\s*[:\-]?\s*\(?\s*\**([{set_}])\**\s*\)?(?![A-Za-z])", re.IGNORECASE),
        (rf"\\boxed\{{\s*(?:\\text\{{)?([{set_}])\}}?\s*\}}", 0),
        (rf"\(([{set_}])\)", 0),
        (rf"^\s*\**([{set_}])[.)]", re.MULTILINE),
    ]
    for pattern, flags in patterns:
        found = re.findall(pattern, text, flags)
        if found:
            return found[-1].upper()
    bare = text.strip().strip(string.punctuation + " *").strip()
    if len(bare) == 1 and bare.upper() in letters and bare.isupper():
        return bare
    if choices:
        norm = normalize_text(text)
        for letter, choice in choices.items():
            if norm and norm == normalize_text(choice):
                return letter
    return None


def multiple_choice_reward(
    task: dict, action: Any, *, answer_key: str = "answer", choices_key: str = "choices"
) -> RewardOutput:
    """1.0 when the extracted letter equals the task's answer letter."""
    letters = _letters(task, choices_key)
    texts = _choice_texts(task, choices_key)
    answer = task_value(task, answer_key, "multiple_choice")
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(letters):
        gold = letters[answer]
    elif isinstance(answer, str) and answer.strip().upper() in letters and len(answer.strip()) == 1:
        gold = answer.strip().upper()
    else:
        gold = next(
            (k for k, v in texts.items() if isinstance(answer, str) and normalize_text(v) == normalize_text(answer)),
            None,
        )
        if gold is None:
            raise RewardTaskError(
                f"reward 'multiple_choice': task[{answer_key!r}]={answer!r} is not a letter in {letters}, "
                "an index, or the text of a choice"
            )
    text, reason = action_text(action)
    if text is None:
        return zero(reason, gold=gold)
    chosen = extract_choice(text, letters, texts)
    if chosen is None:
        return zero("no choice found in the response", gold=gold)
    ok = chosen == gold
    return RewardOutput(reward=float(ok), is_correct=ok, metadata={"chosen": chosen, "gold": gold})
