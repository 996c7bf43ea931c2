"""The one internal training/eval record every source produces and the pipeline consumes.

Mirrors the items of LLaMA2-Accessory's `FinetuneDialogDataset` ({"image": path, "conversations": [...]})
plus the task name the mixture and the task-specific prompts need.
"""
from __future__ import annotations

import dataclasses

TASKS = ("conversation", "vqa", "rec", "reg", "grounded_caption", "detection", "layout", "pose", "text")


@dataclasses.dataclass(frozen=True)
class Record:
  """One sample.

  id: stable identifier (source name + index/key) used in warnings and bad-data counts.
  task: one of TASKS.
  conversations: turns as in the original's data: ({"from": "human"|"gpt"|"assistant", "value": str}, ...);
    empty for plain text.
  image: a file path or the encoded image bytes (JPEG/PNG); None for text-only samples.
  text: the raw text of a plain-text corpus sample (task "text"); None otherwise.
  """
  id: str
  task: str
  conversations: tuple = ()
  image: str | bytes | None = None
  text: str | None = None
