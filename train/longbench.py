"""Long-context suites from local files: LongBench, LongBench v2 and RULER, each scored with its metric.

The suites are not downloaded here: the user fetches their public data files once (docs/p2.md) and
passes the path. Layouts read:
- longbench:    DIR/<task>.jsonl or DIR/data/<task>.jsonl (THUDM/LongBench data.zip); optional
                DIR/dataset2prompt.json or DIR/config/dataset2prompt.json for the suite's prompts.
- longbench_v2: DIR/data.json (THUDM/LongBench-v2), four-choice questions scored by log-likelihood.
- ruler:        any .../<task>/validation.jsonl under DIR (RULER's prepare.py output; a numeric
                ancestor directory names the length).
A runner gives `loglik(context_ids, continuations)` and `greedy(context_ids, max_new, stop_id)`:
train.passkey.ModelRunner (our GPT) or `HFRunner` (an export, with a KV cache for long generations).
"""
from __future__ import annotations

import json
import re
import string
from collections import Counter
from dataclasses import dataclass
from difflib import SequenceMatcher
from pathlib import Path

SUITES = ("longbench", "longbench_v2", "ruler")
DOWNLOADS = {
    "longbench": "https://huggingface.co/datasets/THUDM/LongBench/resolve/main/data.zip (unzip; data/*.jsonl)",
    "longbench_v2": "https://huggingface.co/datasets/THUDM/LongBench-v2 (data.json)",
    "ruler": "github.com/NVIDIA/RULER: scripts/data/prepare.py writes <task>/validation.jsonl per length",
}


class LongBenchError(Exception):
    """A missing suite path, an unknown task or an unreadable data file; one-line message."""


def require_path(suite: str, path) -> Path:
    if suite not in SUITES:
        raise LongBenchError(f"unknown suite {suite!r}: choose one of {', '.join(SUITES)}")
    if path is None or not Path(path).exists():
        raise LongBenchError(f"{suite} data not found at {path}: download it once ({DOWNLOADS[suite]}) "
                             f"and pass its directory")
    return Path(path)


# ---------------------------------------------------------------- metrics (LongBench's metrics.py, English)

def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def qa_f1(prediction: str, truth: str, **_) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, truth: str, **_) -> float:
    """ROUGE-L F1 over whitespace tokens (LCS)."""
    a, b = prediction.lower().split(), truth.lower().split()
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def classification_score(prediction: str, truth: str, all_classes=(), **_) -> float:
    matches = [c for c in all_classes if c in prediction]
    matches = [c for c in matches if not (c in truth and c != truth)]
    return 1.0 / len(matches) if truth in matches else 0.0


def retrieval_score(prediction: str, truth: str, **_) -> float:
    target = re.findall(r"Paragraph (\d+)", truth)
    numbers = re.findall(r"\d+", prediction)
    if not target or not numbers:
        return 0.0
    return sum(n == target[0] for n in numbers) / len(numbers)


def count_score(prediction: str, truth: str, **_) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == str(truth) for n in numbers) / len(numbers) if numbers else 0.0


def code_sim(prediction: str, truth: str, **_) -> float:
    lines = [ln for ln in prediction.lstrip("\n").split("\n") if not any(m in ln for m in ("`", "#", "//"))]
    return SequenceMatcher(None, lines[0] if lines else "", truth).ratio()


def string_match_all(prediction: str, truths: list[str]) -> float:
    """RULER: the fraction of references found in the prediction."""
    return sum(t.lower() in prediction.lower() for t in truths) / len(truths)


def string_match_part(prediction: str, truths: list[str]) -> float:
    """RULER (QA): 1 if any reference is found."""
    return float(any(t.lower() in prediction.lower() for t in truths))


# task -> (metric, max new tokens), LongBench's English tasks
LONGBENCH_TASKS = {
    "narrativeqa": (qa_f1, 128), "qasper": (qa_f1, 128), "multifieldqa_en": (qa_f1, 64),
    "hotpotqa": (qa_f1, 32), "2wikimqa": (qa_f1, 32), "musique": (qa_f1, 32),
    "gov_report": (rouge_l, 512), "qmsum": (rouge_l, 512), "multi_news": (rouge_l, 512),
    "trec": (classification_score, 64), "triviaqa": (qa_f1, 32), "samsum": (rouge_l, 128),
    "passage_count": (count_score, 32), "passage_retrieval_en": (retrieval_score, 32),
    "lcc": (code_sim, 64), "repobench-p": (code_sim, 64),
}
FIRST_LINE_TASKS = ("trec", "triviaqa", "samsum")  # LongBench scores only the first line of these
GENERIC_PROMPT = "{context}\n\nQuestion: {input}\nAnswer:"
RULER_MAX_NEW = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}


# ---------------------------------------------------------------- runner over an exported HF model

@dataclass
class HFRunner:
    """loglik/greedy on a LlamaForCausalLM (e.g. train.export_hf.load_exported); generate() keeps a KV cache."""

    model: object
    device: object = "cpu"

    def loglik(self, context: list[int], continuations: list[list[int]]) -> list[float]:
        import torch

        scores = []
        with torch.no_grad():
            for c in continuations:
                idx = torch.tensor([context + c], device=self.device)
                h = self.model.model(input_ids=idx).last_hidden_state[0, len(context) - 1:-1]
                logp = torch.log_softmax(self.model.lm_head(h).float(), dim=-1)
                scores.append(float(logp[torch.arange(len(c)), torch.tensor(c, device=self.device)].sum()))
        return scores

    def greedy(self, context: list[int], max_new_tokens: int, stop_id: int | None = None) -> list[int]:
        import torch

        idx = torch.tensor([context], device=self.device)
        with torch.no_grad():
            out = self.model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=max_new_tokens,
                                      do_sample=False, eos_token_id=stop_id, pad_token_id=stop_id)
        new = out[0, len(context):].tolist()
        return new[:new.index(stop_id)] if stop_id in new else new


def truncate_middle(ids: list[int], budget: int) -> list[int]:
    """LongBench's truncation: keep the first and last budget/2 tokens."""
    if len(ids) <= budget:
        return ids
    half = budget // 2
    return ids[:half] + ids[len(ids) - (budget - half):]


def _read_jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise LongBenchError(f"cannot read {path}: {e}") from None


# ---------------------------------------------------------------- suites

def longbench_files(root: Path) -> dict[str, Path]:
    files = {}
    for d in (root, root / "data"):
        for name in LONGBENCH_TASKS:
            if (d / f"{name}.jsonl").exists():
                files.setdefault(name, d / f"{name}.jsonl")
    return files


def eval_longbench(runner, tokenizer, root, max_length: int, tasks=None, limit: int | None = None) -> dict:
    root = require_path("longbench", root)
    files = longbench_files(root)
    if not files:
        raise LongBenchError(f"no LongBench task files (<task>.jsonl) in {root} or {root / 'data'}")
    unknown = sorted(set(tasks or ()) - set(LONGBENCH_TASKS))
    if unknown:
        raise LongBenchError(f"unknown LongBench tasks {unknown}: known {', '.join(LONGBENCH_TASKS)}")
    prompts = {}
    for p in (root / "dataset2prompt.json", root / "config" / "dataset2prompt.json"):
        if p.exists():
            prompts = json.loads(p.read_text())
    out = {}
    for name in tasks or sorted(files):
        if name not in files:
            raise LongBenchError(f"LongBench task {name!r} has no file in {root}")
        metric, max_new = LONGBENCH_TASKS[name]
        template = prompts.get(name, GENERIC_PROMPT)
        scores = []
        for row in _read_jsonl(files[name])[:limit]:
            ids = truncate_middle(tokenizer.encode(template.format(**row)), max_length - max_new)
            pred = tokenizer.decode(runner.greedy(ids, max_new, tokenizer.eos_id))
            if name in FIRST_LINE_TASKS:
                pred = pred.lstrip("\n").split("\n")[0]
            scores.append(max(metric(pred, gt, all_classes=row.get("all_classes") or ())
                              for gt in row["answers"]))
        out[name] = {"score": sum(scores) / len(scores) if scores else None, "n": len(scores),
                     "metric": metric.__name__}
    return out


V2_TEMPLATE = ("Please read the following text and answer the question below.\n\n<text>\n{context}\n</text>\n\n"
               "What is the correct answer to this question: {question}\nChoices:\n(A) {choice_A}\n(B) {choice_B}\n"
               "(C) {choice_C}\n(D) {choice_D}\n\nThe correct answer is (")


def eval_longbench_v2(runner, tokenizer, root, max_length: int, limit: int | None = None) -> dict:
    root = require_path("longbench_v2", root)
    path = root / "data.json" if root.is_dir() else root
    if not path.exists():
        raise LongBenchError(f"no data.json in {root}")
    try:
        rows = json.loads(path.read_text())[:limit]
    except json.JSONDecodeError as e:
        raise LongBenchError(f"cannot read {path}: {e}") from None
    letters = [tokenizer.encode(x) for x in "ABCD"]
    correct, by = 0, {}
    for row in rows:
        ids = truncate_middle(tokenizer.encode(V2_TEMPLATE.format(**row)), max_length - 1)
        scores = runner.loglik(ids, letters)
        ok = "ABCD"[scores.index(max(scores))] == row["answer"]
        correct += ok
        for key in ("difficulty", "length"):
            if row.get(key):
                cell = by.setdefault(f"{key}={row[key]}", [0, 0])
                cell[0], cell[1] = cell[0] + ok, cell[1] + 1
    return {"overall": {"acc": correct / len(rows) if rows else None, "n": len(rows)},
            **{k: {"acc": c / n, "n": n} for k, (c, n) in sorted(by.items())}}


def ruler_files(root: Path) -> list[tuple[str, int | None, Path]]:
    found = []
    for path in sorted(root.rglob("validation.jsonl")):
        length = next((int(p.name) for p in path.parents if p.name.isdigit()), None)
        found.append((path.parent.name, length, path))
    return found


def eval_ruler(runner, tokenizer, root, max_length: int, limit: int | None = None) -> dict:
    root = require_path("ruler", root)
    files = ruler_files(root)
    if not files:
        raise LongBenchError(f"no RULER data (<task>/validation.jsonl) under {root}")
    out = {}
    for task, length, path in files:
        family = task.split("_")[0]
        max_new = RULER_MAX_NEW.get(family, 64)
        metric = string_match_part if family == "qa" else string_match_all
        scores = []
        for row in _read_jsonl(path)[:limit]:
            text = row["input"] + row.get("answer_prefix", "")
            ids = tokenizer.encode(text)
            if len(ids) + max_new > max_length:
                continue  # RULER sizes prompts for the length; never truncate away the needle
            pred = tokenizer.decode(runner.greedy(ids, max_new, tokenizer.eos_id))
            scores.append(metric(pred, row["outputs"]))
        key = f"{length}/{task}" if length else task
        out[key] = {"score": sum(scores) / len(scores) if scores else None, "n": len(scores),
                    "metric": metric.__name__}
    return out


def evaluate_suite(suite: str, runner, tokenizer, path, max_length: int, limit: int | None = None) -> dict:
    """One suite's results: {task: {"score" or "acc", "n", ...}}."""
    require_path(suite, path)
    if suite == "longbench":
        return eval_longbench(runner, tokenizer, path, max_length, limit=limit)
    if suite == "longbench_v2":
        return eval_longbench_v2(runner, tokenizer, path, max_length, limit=limit)
    return eval_ruler(runner, tokenizer, path, max_length, limit=limit)
