"""SQuAD v1.1 data for the prune-and-recover example: loading, checks, features, answers, metric.

The Hub's `squad` and local SQuAD-format JSON files go through the same code: both become a `datasets.Dataset`
with the `squad` schema (id, title, context, question, answers{text, answer_start}). Preprocessing follows the
reference tutorial (max length 384, overflowing windows with a stride, offset mapping).
"""

from __future__ import annotations

import collections
import json

import numpy as np


class SquadDataError(ValueError):
    """The data is not usable; raised before any training starts."""


def read_squad_json(path: str, limit: int | None = None) -> list[dict]:
    """Flatten a SQuAD v1.1 JSON file into rows of the `squad` schema, checking every answer offset."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise SquadDataError(f"{path} is not JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise SquadDataError(f"{path} is not SQuAD-shaped: expected {{'version', 'data': [articles]}}")
    rows = []
    for a, article in enumerate(data["data"]):
        for p, paragraph in enumerate(article.get("paragraphs", []) if isinstance(article, dict) else []):
            context = paragraph.get("context")
            if not isinstance(context, str) or not isinstance(paragraph.get("qas"), list):
                raise SquadDataError(
                    f"{path}: data[{a}].paragraphs[{p}] lacks a context string or a qas list"
                )
            for qa in paragraph["qas"]:
                answers = qa.get("answers") or []
                if not answers or "id" not in qa or "question" not in qa:
                    raise SquadDataError(
                        f"{path}: question {qa.get('id', '?')} lacks an id, a question or answers"
                    )
                for ans in answers:
                    start, text = ans.get("answer_start"), ans.get("text", "")
                    if not isinstance(start, int) or context[start : start + len(text)] != text:
                        raise SquadDataError(
                            f"{path}: answer {text!r} of question {qa['id']} does not occur at offset {start} of "
                            f"its context (found {context[start : start + len(text)]!r})"
                        )
                rows.append(
                    {
                        "id": qa["id"],
                        "title": article.get("title", ""),
                        "context": context,
                        "question": qa["question"],
                        "answers": {
                            "text": [x["text"] for x in answers],
                            "answer_start": [x["answer_start"] for x in answers],
                        },
                    }
                )
                if limit and len(rows) >= limit:
                    return rows
    if not rows:
        raise SquadDataError(f"{path} holds no questions")
    return rows


def load_squad(
    train_file: str | None,
    validation_file: str | None,
    limit_train: int | None = None,
    limit_eval: int | None = None,
):
    """(train, validation) datasets: local files when given, else the Hub's `squad`."""
    from datasets import Dataset, load_dataset

    if train_file or validation_file:
        if not (train_file and validation_file):
            raise SquadDataError("give both --train-file and --validation-file, or neither (Hub 'squad')")
        train = Dataset.from_list(read_squad_json(train_file, limit_train))
        valid = Dataset.from_list(read_squad_json(validation_file, limit_eval))
    else:
        hub = load_dataset("squad")
        train, valid = hub["train"], hub["validation"]
        if limit_train:
            train = train.select(range(min(limit_train, len(train))))
        if limit_eval:
            valid = valid.select(range(min(limit_eval, len(valid))))
    return train, valid


def _tokenize_windows(examples, tokenizer, max_length: int, stride: int):
    """Question + context, the context cut into overlapping windows of `max_length` tokens."""
    questions = [q.lstrip() for q in examples["question"]]
    return tokenizer(
        questions,
        examples["context"],
        truncation="only_second",
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length",
    )


def prepare_train_features(examples, tokenizer, max_length: int = 384, stride: int = 128):
    enc = _tokenize_windows(examples, tokenizer, max_length, stride)
    sample_map = enc.pop("overflow_to_sample_mapping")
    starts, ends = [], []
    for i, offsets in enumerate(enc.pop("offset_mapping")):
        answers = examples["answers"][sample_map[i]]
        start_char = answers["answer_start"][0]
        end_char = start_char + len(answers["text"][0])
        seq = enc.sequence_ids(i)
        ctx_start = seq.index(1)
        ctx_end = len(seq) - 1 - seq[::-1].index(1)
        if offsets[ctx_start][0] > start_char or offsets[ctx_end][1] < end_char:
            starts.append(0)  # the answer is not in this window: point at [CLS]
            ends.append(0)
            continue
        s = ctx_start
        while s <= ctx_end and offsets[s][0] <= start_char:
            s += 1
        e = ctx_end
        while e >= ctx_start and offsets[e][1] >= end_char:
            e -= 1
        starts.append(s - 1)
        ends.append(e + 1)
    enc["start_positions"] = starts
    enc["end_positions"] = ends
    return enc


def prepare_eval_features(examples, tokenizer, max_length: int = 384, stride: int = 128):
    enc = _tokenize_windows(examples, tokenizer, max_length, stride)
    sample_map = enc.pop("overflow_to_sample_mapping")
    enc["example_id"] = []
    for i in range(len(enc["input_ids"])):
        seq = enc.sequence_ids(i)
        enc["example_id"].append(examples["id"][sample_map[i]])
        enc["offset_mapping"][i] = [
            o if seq[k] == 1 else None for k, o in enumerate(enc["offset_mapping"][i])
        ]
    return enc


def postprocess(examples, features, start_logits, end_logits, n_best: int = 20, max_answer_length: int = 30):
    """Best answer text per example from window logits (the standard n-best span search)."""
    by_example = collections.defaultdict(list)
    for i, example_id in enumerate(features["example_id"]):
        by_example[example_id].append(i)
    predictions = []
    for example in examples:
        best, best_score = "", -np.inf
        for fi in by_example[example["id"]]:
            offsets = features[fi]["offset_mapping"]
            s_idx = np.argsort(start_logits[fi])[-1 : -n_best - 1 : -1]
            e_idx = np.argsort(end_logits[fi])[-1 : -n_best - 1 : -1]
            for s in s_idx:
                for e in e_idx:
                    if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                        continue
                    score = start_logits[fi][s] + end_logits[fi][e]
                    if score > best_score:
                        best_score, best = score, example["context"][offsets[s][0] : offsets[e][1]]
        predictions.append({"id": example["id"], "prediction_text": best})
    return predictions


def squad_metric(predictions: list[dict], examples) -> dict:
    """Exact match and F1: `evaluate`'s squad metric when it can be loaded, else torchmetrics' SQuAD."""
    references = [{"id": ex["id"], "answers": ex["answers"]} for ex in examples]
    try:
        import evaluate

        result = evaluate.load("squad").compute(predictions=predictions, references=references)
        source = "evaluate"
    except Exception:  # noqa: BLE001 - offline, or evaluate missing: fall back to the local implementation
        from torchmetrics.text import SQuAD

        result = {k: float(v) for k, v in SQuAD()(predictions, references).items()}
        source = "torchmetrics"
    return {"exact_match": float(result["exact_match"]), "f1": float(result["f1"]), "metric": source}
