r"""The `conv_v1_2` dialogue template and the training tokenisation of LLaMA2-Accessory.

Mirrors `accessory/data/conversation/lib.py` (Conversation.process, SeparatorStyle.SINGLE, conv_v1_2) and
`accessory/data/conversation/dataset.py` (ConversationGenerator, FinetuneDialogDataset.get_item_func).

Rendering: SYSTEM + "\n\n###", then " <Role>: <text>\n###" per turn; an unfinished last assistant turn renders
" Assistant:". Training: the whole text is tokenised with BOS and EOS; the label positions are the token spans
of every assistant reply + "\n###" (found left to right); BOS, system, human turns, role tags and EOS are not
trained; then right truncation to `max_len - image_words` and right padding with id 0.

Out: `Sample(tokens int32[L], loss_mask bool[L], length)`; `loss_mask[i]` says token i is a target, i.e. the
loss compares logits at position i-1 with tokens[i] (the original's logits[:, :-1] vs labels[:, 1:]).
`pack` lays several text-only samples into one row with segment ids (0 = padding) and per-segment positions.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from sphinx_jax.errors import SphinxError

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
ROLES = ("Human", "Assistant")
SEP = "###"
STOP = "\n" + SEP  # the reply terminator (`response_end_signal`) and the generation stop string
IMAGE_PLACEHOLDER = "<image>"
_ROLE_OF = {"human": ROLES[0], "gpt": ROLES[1], "assistant": ROLES[1]}


@dataclasses.dataclass(frozen=True)
class Sample:
  """One tokenised dialogue. tokens int32[L] (0-padded), loss_mask bool[L], length: real tokens (<= L)."""
  tokens: np.ndarray
  loss_mask: np.ndarray
  length: int


@dataclasses.dataclass(frozen=True)
class Packed:
  """Text-only samples packed in one row. tokens int32[L], loss_mask bool[L], segment_ids int32[L] (1, 2, ...
  per sample, 0 on padding), positions int32[L] (restart at 0 in every segment, as if unpacked)."""
  tokens: np.ndarray
  loss_mask: np.ndarray
  segment_ids: np.ndarray
  positions: np.ndarray


def turns_of(conversations, record_id="?") -> list[tuple[str, str]]:
  """Record conversations ({"from", "value"} dicts) -> [(role, text)], `<image>` removed and text stripped."""
  if not isinstance(conversations, (list, tuple)):
    raise SphinxError(f"record {record_id}: 'conversations' is a {type(conversations).__name__}, not a list of "
                      f"turns; fix the data file")
  turns = []
  for i, turn in enumerate(conversations):
    try:
      speaker, value = turn["from"], turn["value"]
    except (KeyError, TypeError):
      raise SphinxError(f"record {record_id}: turn {i} is not a {{'from', 'value'}} object; fix the data "
                        f"file") from None
    role = _ROLE_OF.get(str(speaker).lower())
    if role is None:
      raise SphinxError(f"record {record_id}: turn {i} has unknown speaker {speaker!r}; use 'human', 'gpt' or "
                        f"'assistant'")
    turns.append((role, str(value).replace(IMAGE_PLACEHOLDER, "").strip()))
  return turns


def render(turns) -> tuple[str, list[str]]:
  r"""[(role, text | None)] -> (conversation text, assistant replies to predict, each + "\n###").

  Example: [("Human", "Hi"), ("Assistant", "Hello")] ->
  ("<SYSTEM>\n\n### Human: Hi\n### Assistant: Hello\n###", ["Hello\n###"]).
  A None text is allowed only last and renders " <role>:" (the open turn the model completes).
  """
  text = SYSTEM + "\n\n" + SEP
  replies = []
  for i, (role, message) in enumerate(turns):
    if message is None:
      if i != len(turns) - 1:
        raise SphinxError(f"conversation turn {i}: only the last turn may be left open (None)")
      text += " " + role + ":"
      continue
    text += " " + role + ": " + message + STOP
    if role == ROLES[1]:
      replies.append(message + STOP)
  return text, replies


def render_prompt(history, question: str, prefill: str = "") -> str:
  r"""Inference prompt: [(q, a), ...] earlier rounds, the new question, an open assistant turn.

  `prefill` is appended after " Assistant:" verbatim (ScienceQA uses " The answer is").
  Example: render_prompt([], "What?") == SYSTEM + "\n\n### Human: What?\n### Assistant:".
  """
  turns = []
  for q, a in history:
    turns += [(ROLES[0], q), (ROLES[1], a)]
  text, _ = render(turns + [(ROLES[0], question), (ROLES[1], None)])
  return text + prefill


def encode_prompt(tokenizer, history, question: str, prefill: str = "") -> list[int]:
  """Prompt ids as the original's generate() builds them: BOS, no EOS."""
  return tokenizer.encode(render_prompt(history, question, prefill), bos=True, eos=False)


def cut_reply(text: str) -> str:
  """Generated text -> the reply: everything before the first "###", right-stripped (as the evaluator does)."""
  end = text.find(SEP)
  return (text[:end] if end != -1 else text).rstrip()


def find_sublist(haystack: list, needle: list, start: int = 0) -> int:
  """First i >= start with haystack[i:i+len(needle)] == needle, else -1."""
  n = len(needle)
  for i in range(start, len(haystack) - n + 1):
    if haystack[i:i + n] == needle:
      return i
  return -1


def label_positions(tokenizer, ids: list[int], replies: list[str], record_id="?") -> np.ndarray:
  """bool[len(ids)]: True on the tokens of each reply, each searched after the previous one."""
  mask = np.zeros(len(ids), bool)
  pos = 0
  for k, reply in enumerate(replies):
    piece = tokenizer.encode_segment(reply)
    at = find_sublist(ids, piece, pos)
    if at == -1:
      raise SphinxError(f"record {record_id}: assistant reply {k} does not tokenise the same inside the "
                        f"conversation; the sample is skipped (check the text for odd whitespace)")
    mask[at:at + len(piece)] = True
    pos = at + len(piece)
  return mask


def tokenize_dialog(tokenizer, conversations, *, max_len: int, image_words: int = 0,
                    record_id="?") -> Sample:
  """Record conversations -> Sample of static length `max_len - image_words` (image_words = 0 without image).

  Raises SphinxError when a reply cannot be located or nothing is left to predict after truncation (the
  original skips such items too).
  """
  length = max_len - image_words
  if length <= 0:
    raise SphinxError(f"max_len={max_len} leaves no room for text after {image_words} image tokens; raise "
                      f"max_len above {image_words}")
  text, replies = render(turns_of(conversations, record_id))
  if not replies:
    raise SphinxError(f"record {record_id}: no assistant turn, nothing to predict; the sample is skipped")
  ids = tokenizer.encode(text, bos=True, eos=True)
  # Labelled id 0 is dropped too: the original turns labels into ids and ignores index 0 in the loss.
  mask = label_positions(tokenizer, ids, replies, record_id) & (np.asarray(ids) != 0)
  ids, mask = ids[:length], mask[:length]
  if not mask.any():
    raise SphinxError(f"record {record_id}: nothing left to predict after truncation to {length} text tokens; "
                      f"raise max_len or shorten the sample")
  tokens = np.zeros(length, np.int32)
  loss_mask = np.zeros(length, bool)
  tokens[:len(ids)] = ids
  loss_mask[:len(ids)] = mask
  return Sample(tokens, loss_mask, len(ids))


def pack(samples, length: int) -> list[Packed]:
  """Greedy in-order packing of text-only samples into rows of `length` tokens; a sample never splits.

  A new row starts when the next sample does not fit. Raises SphinxError for a sample longer than `length`.
  """
  rows, current, used = [], [], 0
  for s in samples:
    if s.length > length:
      raise SphinxError(f"a sample of {s.length} tokens does not fit a packed row of {length}; tokenise with "
                        f"max_len <= {length}")
    if used + s.length > length:
      rows.append(_pack_row(current, length))
      current, used = [], 0
    current.append(s)
    used += s.length
  if current:
    rows.append(_pack_row(current, length))
  return rows


def _pack_row(samples, length: int) -> Packed:
  tokens = np.zeros(length, np.int32)
  loss_mask = np.zeros(length, bool)
  segment_ids = np.zeros(length, np.int32)
  positions = np.zeros(length, np.int32)
  at = 0
  for seg, s in enumerate(samples, start=1):
    n = s.length
    tokens[at:at + n] = s.tokens[:n]
    loss_mask[at:at + n] = s.loss_mask[:n]
    segment_ids[at:at + n] = seg
    positions[at:at + n] = np.arange(n)
    at += n
  return Packed(tokens, loss_mask, segment_ids, positions)
