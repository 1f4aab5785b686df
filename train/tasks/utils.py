"""Dataset loader of the offline demo task (opskit_demo_recall.yaml)."""
from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent / "opskit_demo_recall.jsonl"


def load_demo_recall(**kwargs):
    """{"test": Dataset} from the JSONL shipped with the project; lm-eval passes its metadata as kwargs."""
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(DATA)})
