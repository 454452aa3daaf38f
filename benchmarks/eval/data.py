"""Where the evaluation data lives, and reading it.

The data are offline copies of the public test sets (see the data folder's README.md): GSM8K,
IFEval, MMLU-Pro and NLTK's punkt_tab.  Nothing is copied into this repository.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

REPO_ROOT = Path(__file__).resolve().parents[2]
# Searched in this order when --data-dir is not given.
DEFAULT_DATA_DIRS = (REPO_ROOT / "shared" / "data", REPO_ROOT.parent / "shared" / "data",
                     Path("/work/shared/data"))
DATA_ENV = "FH_EVAL_DATA"


class DataError(FileNotFoundError):
    """An evaluation file is missing or malformed."""


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding gsm8k/, ifeval/, mmlu_pro/ and nltk_data/.

    Order: the argument, then $FH_EVAL_DATA, then <repo>/shared/data, <repo>/../shared/data,
    then /work/shared/data.
    """
    if data_dir is not None:
        candidates = [Path(data_dir)]
    elif os.environ.get(DATA_ENV):
        candidates = [Path(os.environ[DATA_ENV])]
    else:
        candidates = list(DEFAULT_DATA_DIRS)
    for c in candidates:
        if c.is_dir():
            return c
    raise DataError(f"no evaluation data folder found (looked in {[str(c) for c in candidates]}); "
                    f"pass --data-dir or set ${DATA_ENV}")


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a JSONL file; a clear error names the file and line that fail."""
    return list(iter_jsonl(path))


def iter_jsonl(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing evaluation file {path}")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno} is not valid JSON ({e})") from e
