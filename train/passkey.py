"""Passkey retrieval: a 5-6 digit key hidden at a depth of filler text, at each evaluation length.

Each (length, depth) cell runs several trials. A trial is scored two ways: log-likelihood (is the true
key the most likely of `candidates` keys with as many digits?) and greedy generation (does the
continuation's first number equal the key?). Prompts are built in tokens, so a cell's prompt is exactly
`length` tokens. `ModelRunner` (scoring and greedy decoding on our GPT) is shared with train.longbench.

    python -m train.passkey --run-dir RUN --lengths 1024 4096 --depths 0.1 0.5 0.9 --out passkey.json
"""
from __future__ import annotations

import argparse
import random
import re
import sys
import time
from dataclasses import dataclass

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
DEFAULT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


class PasskeyError(Exception):
    """Bad passkey settings; one-line message."""


# ---------------------------------------------------------------- scoring on our model

@dataclass
class ModelRunner:
    """Log-likelihoods and greedy continuations from a train.model.GPT (or anything with
    `hidden_states(idx)` and a tied `embed`), computing logits only where they are needed."""

    model: object
    device: object = "cpu"
    batch_size: int = 4

    def _logits(self, h):
        import torch.nn.functional as F

        return F.linear(h, self.model.embed.weight).float()

    def loglik(self, context: list[int], continuations: list[list[int]]) -> list[float]:
        """Sum of log p(continuation tokens | context) for each continuation."""
        import torch

        scores = []
        with torch.no_grad():
            for start in range(0, len(continuations), self.batch_size):
                group = continuations[start:start + self.batch_size]
                width = max(len(c) for c in group)
                # Right-padding never changes earlier positions of a causal model.
                rows = [context + c + [c[-1]] * (width - len(c)) for c in group]
                idx = torch.tensor(rows, device=self.device)
                h = self.model.hidden_states(idx)[:, len(context) - 1:len(context) - 1 + width]
                logp = torch.log_softmax(self._logits(h), dim=-1)
                for i, c in enumerate(group):
                    target = torch.tensor(c, device=self.device)
                    scores.append(float(logp[i, torch.arange(len(c), device=self.device), target].sum()))
        return scores

    def greedy(self, context: list[int], max_new_tokens: int, stop_id: int | None = None) -> list[int]:
        """Greedy continuation (no KV cache: one forward per new token, fine for a few tokens)."""
        import torch

        ids, out = list(context), []
        with torch.no_grad():
            for _ in range(max_new_tokens):
                h = self.model.hidden_states(torch.tensor([ids], device=self.device))[:, -1]
                nxt = int(self._logits(h).argmax(-1))
                if nxt == stop_id:
                    break
                out.append(nxt)
                ids.append(nxt)
        return out


# ---------------------------------------------------------------- prompts (pure)

@dataclass(frozen=True)
class Prompt:
    context: list[int]  # exactly `length` tokens, ending with the question
    answer: list[int]   # tokens of " <key>"
    key: int
    needle_at: int      # token index where the needle starts


def key_digits(key: int) -> int:
    return len(str(key))


def draw_keys(rng: random.Random, n: int) -> list[int]:
    """The true key (5 or 6 digits) first, then n-1 distinct distractors with as many digits."""
    digits = rng.choice((5, 6))
    lo, hi = 10 ** (digits - 1), 10 ** digits - 1
    keys = [rng.randint(lo, hi)]
    while len(keys) < n:
        k = rng.randint(lo, hi)
        if k not in keys:
            keys.append(k)
    return keys


def build_prompt(encode, length: int, depth: float, key: int) -> Prompt:
    """Intro + filler with the needle at `depth` (a filler-sentence boundary) + question; `length` tokens."""
    if not 0.0 <= depth <= 1.0:
        raise PasskeyError(f"depth must be in [0, 1], got {depth}")
    intro, unit, question = encode(INTRO), encode(FILLER), encode(QUESTION)
    needle = encode(NEEDLE.format(key=key))
    n_fill = length - len(intro) - len(needle) - len(question)
    if n_fill < len(unit):
        raise PasskeyError(f"length {length} is too short for a passkey prompt "
                           f"(needs at least {length - n_fill + len(unit)} tokens)")
    filler = (unit * (n_fill // len(unit) + 1))[:n_fill]
    cut = min(round(depth * n_fill / len(unit)) * len(unit), n_fill)
    context = intro + filler[:cut] + needle + filler[cut:] + question
    assert len(context) == length
    return Prompt(context, encode(f" {key}"), key, len(intro) + cut)


def first_number(text: str) -> str | None:
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


# ---------------------------------------------------------------- the grid

def _fmt_depth(d: float) -> str:
    return f"{d:g}"


def evaluate_passkey(runner: ModelRunner, tokenizer, lengths, depths=DEFAULT_DEPTHS, trials: int = 5,
                     candidates: int = 5, seed: int = 0, on_cell=None) -> dict:
    """passkey.json: accuracy by length x depth, by log-likelihood and by greedy generation.

    `tokenizer` has encode(text) -> ids, decode(ids) -> text, eos_id (train.data.tokenizer.Tokenizer).
    `on_cell(length, depth)` is called before each cell (a heartbeat hook).
    """
    if trials < 1 or candidates < 2:
        raise PasskeyError(f"need trials >= 1 and candidates >= 2, got {trials} and {candidates}")
    started = time.time()
    ll_grid, gen_grid, cells, skipped = {}, {}, [], {}
    for length in lengths:
        for depth in depths:
            if on_cell:
                on_cell(length, depth)
            ll_ok = gen_ok = 0
            try:
                for trial in range(trials):
                    rng = random.Random(f"{seed}-{length}-{depth}-{trial}")
                    keys = draw_keys(rng, candidates)
                    prompt = build_prompt(tokenizer.encode, length, depth, keys[0])
                    scores = runner.loglik(prompt.context, [tokenizer.encode(f" {k}") for k in keys])
                    ll_ok += int(scores[0] > max(scores[1:]))
                    generated = runner.greedy(prompt.context, len(prompt.answer) + 2, tokenizer.eos_id)
                    gen_ok += int(first_number(tokenizer.decode(generated)) == str(prompt.key))
            except PasskeyError as e:
                skipped[str(length)] = str(e)
                break
            ll_grid.setdefault(str(length), {})[_fmt_depth(depth)] = ll_ok / trials
            gen_grid.setdefault(str(length), {})[_fmt_depth(depth)] = gen_ok / trials
            cells.append({"length": length, "depth": depth, "trials": trials, "ll_correct": ll_ok,
                          "gen_correct": gen_ok, "needle_at": prompt.needle_at})
    by_length = {
        length: {"ll_acc": sum(row.values()) / len(row), "gen_acc": sum(gen_grid[length].values()) / len(row)}
        for length, row in ll_grid.items()
    }
    return {
        "lengths": list(lengths), "depths": list(depths), "trials": trials, "candidates": candidates,
        "seed": seed, "ll_accuracy": ll_grid, "gen_accuracy": gen_grid, "by_length": by_length,
        "cells": cells, "skipped": skipped, "time_s": round(time.time() - started, 3),
    }


def peak_memory(device) -> dict:
    """Peak accelerator memory since the last reset (CUDA), else this process's peak RSS."""
    import resource

    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)), "peak_memory_kind": "cuda"}
    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_memory_kind": "cpu_rss"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.passkey", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, help="a trained run's directory (spec.json, ckpt/)")
    parser.add_argument("--lengths", type=int, nargs="+", required=True, help="prompt lengths in tokens")
    parser.add_argument("--depths", type=float, nargs="+", default=list(DEFAULT_DEPTHS))
    parser.add_argument("--trials", type=int, default=5, help="trials per (length, depth) cell")
    parser.add_argument("--candidates", type=int, default=5, help="keys compared by log-likelihood")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="path of the passkey.json to write")
    args = parser.parse_args(argv)

    import torch

    from train.contract import atomic_write_json
    from train.data.tokenizer import load_tokenizer
    from train.export_hf import ExportError, load_run_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        loaded = load_run_model(args.run_dir, device=device)
        tok = load_tokenizer(loaded.spec["tokenizer"], loaded.spec["cache_dir"])
        result = evaluate_passkey(ModelRunner(loaded.model, device), tok, args.lengths, args.depths,
                                  args.trials, args.candidates, args.seed)
    except (ExportError, PasskeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    result.update(run=loaded.spec.get("run"), step=loaded.step, device=str(device), **peak_memory(device))
    atomic_write_json(args.out, result)
    print(f"passkey by length: {result['by_length']} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
