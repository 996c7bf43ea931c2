"""Batched, KV-cached SPHINX generation with the original's sampling and stop rules.

Mirrors `MetaModel.generate`, `stream_generate` and `sample_top_p` of LLaMA2-Accessory `accessory/model/meta.py`
(SPHINX.md §9):
  - sampling: temperature softmax, then nucleus: sort descending, cumulative sum, zero the tokens whose
    preceding mass (cumsum - p) already exceeds top_p, renormalise, draw; temperature 0 is argmax;
  - prompts are left-truncated to `max_seq_len - image_words - max_new_tokens` tokens (BOS may go too, as there);
  - a row stops on EOS or when its generated ids end with a stop string's ids (tokenised the original's two
    ways); the text is cut where the first stop string begins, so "\n###" never shows.
Differences, on purpose: every row gets up to `max_new_tokens` (the original lets shorter prompts of a batch run
longer), only generated ids are matched against stop strings, and draws come from `jax.random` (seedable, not
torch's stream).

The decoder alone is a text-only `Sphinx` (`towers=()`, configs/llama.py): the same loop then decodes a LLaMA
(the HF parity of greedy decoding is proven that way in tests/test_llama.py). Without a tokenizer, prompts are id
lists and rows run to `max_new_tokens` (no EOS is known). `Generator(..., unscan_layers=True)` decodes with the
decoder's layers unscanned (`for_decoding`), the faster layout for single-token steps.

Static shapes: a prompt batch is padded to a length bucket P and the new-token budget to a bucket N, so the
cache holds M + P + N slots and one compiled program serves every prompt of that bucket (`Generator.traces`
counts tracings). Letters: B batch, P prompt bucket, N new-token bucket, M image positions, V vocab, W longest
stop sequence.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sphinx_jax.data.conversation import STOP
from sphinx_jax.errors import SphinxError
from sphinx_jax.models.llama import init_cache, unstack_layers
from sphinx_jax.models.sphinx import Sphinx

SPHINX_STOPS = (STOP,)  # what SPHINX's generate_response passes as additional_stop_symbols
BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096)
STOP_ROWS, STOP_WIDTH = 16, 16  # [EOS] + two tokenisations per stop string, each at most 16 ids
# CPU only: XLA CPU hands few-row products to YNNPACK, which ran [8, 1024] x [1024, 2816] 1.2-1.7x (and
# [8, 1024] x [1024, 32000] 1.2x) slower than XLA's own dot on the 2-core dev box; without YNNPACK fusions the
# config-M decode step of bench/decoder.py at batch 8 took 90-100 ms instead of 114-128 ms (two loaded runs;
# keeping its elementwise and reduction fusions lost most of that gain), batch 1 and the prefill within noise.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


# ----------------------------------------------------------------------------------------------- sampling
def sample_top_p(probs, top_p, uniform):
  """The original `sample_top_p` with an explicit uniform draw (inverse CDF instead of torch.multinomial).

  Args: probs float[B, V] (rows sum to 1), top_p float[], uniform float[B] in [0, 1). Returns int32[B].
  Example: probs [0.5, 0.3, 0.2], p 0.6: cumsum - p_sorted = [0, 0.5, 0.8] keeps the first two -> [0.625,
  0.375, 0]; uniform 0.7 picks token 1.
  """
  order = jnp.argsort(-probs, axis=-1)
  sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
  keep = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs <= top_p
  cdf = jnp.cumsum(jnp.where(keep, sorted_probs, 0.0), axis=-1)
  rank = jnp.sum(cdf <= uniform[:, None] * cdf[:, -1:], axis=-1)
  rank = jnp.minimum(rank, jnp.sum(keep, axis=-1) - 1)  # u * total may round up onto the last kept entry
  return jnp.take_along_axis(order, rank[:, None], axis=-1)[:, 0].astype(jnp.int32)


def next_token(logits, temperature, top_p, key):
  """float[B, V] logits -> int32[B]: argmax when temperature == 0, else softmax(logits / T) then top-p.

  temperature and top_p are traced scalars, so changing them does not recompile.
  A cond, not a select, so that greedy steps skip the sampler's sort over the vocabulary: with a select, a
  greedy step at V 32000 spent 36 ms (batch 1) / 268 ms (batch 8) on it on the 2-core CPU box, more than the
  decoder's matmuls of bench/decoder.py's config M; 0.1 / 0.5 ms with the cond.
  """
  logits = logits.astype(jnp.float32)

  def sample(logits, key):
    probs = jax.nn.softmax(logits / temperature, axis=-1)
    return sample_top_p(probs, top_p, jax.random.uniform(key, logits.shape[:1]))

  return jax.lax.cond(temperature > 0, sample, lambda logits, _: jnp.argmax(logits, axis=-1).astype(jnp.int32),
                      logits, key)


# ----------------------------------------------------------------------------------------------- stopping
def ids_without_prefix_space(tokenizer, s: str) -> list[int]:
  """The original tokenizer's `encode_wo_prefix_space`: ids of `s` glued to preceding text.

  SentencePiece adds a dummy "▁" before `s`; a short prefix that stays its own token absorbs it instead, and is
  cut off again. LLaMA: "\n###" -> ids of "\n" + "###" without the "▁" piece.
  """
  if tokenizer.need_space_before_segment:
    return tokenizer.encode(s, bos=False, eos=False)
  for prefix in ("@", "\n", "\\", "=", ">", "`"):
    alone = tokenizer.encode(prefix, bos=False, eos=False)
    joined = tokenizer.encode(prefix + s, bos=False, eos=False)
    if joined[:len(alone)] == alone:
      return joined[len(alone):]
  raise SphinxError(f"generate: the tokenizer merges every separator into stop string {s!r}; pass stop "
                    "strings that start with a separate character.")


def stop_sequences(tokenizer, stops: Sequence[str]) -> list[list[int]]:
  """[[eos]] + each stop string tokenised as a segment and without its prefix space, as the original."""
  found = [[tokenizer.eos_id]]
  for stop in stops:
    for ids in (tokenizer.encode_segment(stop), ids_without_prefix_space(tokenizer, stop)):
      if ids and ids not in found:
        found.append(list(ids))
  return found


def stop_table(sequences: list[list[int]]) -> np.ndarray:
  """int32[STOP_ROWS, STOP_WIDTH], one fixed shape so that no stop set recompiles the loop: each sequence
  right-aligned with -1 (matches anything) on its left, unused rows all -3.
  Example (rows 3, width 3): [[2], [13, 835]] -> [[-1, -1, 2], [-1, 13, 835], [-3, -3, -3]].
  """
  longest = max((len(s) for s in sequences), default=0)
  if len(sequences) > STOP_ROWS or longest > STOP_WIDTH:
    raise SphinxError(f"generate: {len(sequences)} stop id sequences (EOS + up to two per stop string), the longest "
                      f"{longest} ids; the loop holds {STOP_ROWS} of at most {STOP_WIDTH} "
                      "ids, so pass fewer or shorter stop strings.")
  table = np.full((STOP_ROWS, STOP_WIDTH), -3, np.int32)
  for i, seq in enumerate(sequences):
    table[i] = -1
    table[i, STOP_WIDTH - len(seq):] = seq
  return table


def match_stop(window, table):
  """Does a row's window int[B, W] (its last W generated ids, -2 before the first) end with a stop sequence?

  Returns (hit bool[B], length int32[B] of the first sequence that matched, 0 if none). Unused rows (no id
  >= 0) never match.
  """
  lengths = jnp.sum(table >= 0, axis=-1).astype(jnp.int32)
  same = (table[None] == -1) | (window[:, None, :] == table[None])  # [B, S, W]
  hits = jnp.all(same, axis=-1) & (lengths > 0)
  hit = jnp.any(hits, axis=-1)
  return hit, jnp.where(hit, lengths[jnp.argmax(hits, axis=-1)], 0)


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
  """The text before the first occurrence of any stop string."""
  cut = min([i for i in (text.find(s) for s in stops) if i != -1], default=len(text))
  return text[:cut]


def held_back(text: str, stops: Sequence[str]) -> int:
  """How many trailing characters might still grow into a stop string (a streamed delta must not show them).

  Example: stops ["\\n###"], text "Yes.\\n#" -> 2.
  """
  longest = 0
  for stop in stops:
    for n in range(1, len(stop)):
      if text.endswith(stop[:n]):
        longest = max(longest, n)
  return longest


# ---------------------------------------------------------------------------------------------- lengths
def bucket(n: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= n; above the largest, the next multiple of it."""
  for b in sorted(buckets):
    if n <= b:
      return b
  top = max(buckets)
  return -(-n // top) * top


def truncate_prompt(ids: list[int], max_seq_len: int, image_words: int, max_new_tokens: int) -> list[int]:
  """The original's left truncation: keep the last `max_seq_len - image_words - max_new_tokens` ids."""
  room = max_seq_len - image_words - max_new_tokens
  if room <= 0:
    raise SphinxError(f"generate: max_new_tokens {max_new_tokens} + {image_words} image tokens leave no room for "
                      f"the prompt in max_seq_len {max_seq_len}; lower max_new_tokens.")
  return ids[-room:]


def pad_prompts(prompts: list[list[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads id lists with 0 to `length`. Returns (int32[B, length], lengths int32[B])."""
  tokens = np.zeros((len(prompts), length), np.int32)
  for i, ids in enumerate(prompts):
    tokens[i, :len(ids)] = ids
  return tokens, np.array([len(p) for p in prompts], np.int32)


# ---------------------------------------------------------------------------------------------- layouts
def decoding_config(model_config):
  """A copy of `model_config` (config.model) with the decoder unscanned, the layout inference runs: a scan
  slices every layer's weights (and, stacked, the whole KV cache) out of the [L, ...] stack at each step."""
  config = model_config.copy_and_resolve_references()
  config.llm.scan_layers = False
  return config


def decode_params(model: Sphinx, params):
  """`params` in `model`'s decoder layout: a scanned `llm` tree ('layers/...' with a leading [L] axis) is unstacked
  when the model's decoder is unscanned; anything else is returned as is."""
  llm = model.config.llm
  if llm.scan_layers or "layers" not in params["llm"]:
    return params
  return dict(params, llm=unstack_layers(params["llm"], llm.n_layers))


def for_decoding(model: Sphinx, params):
  """The same model with its decoder's layers unscanned, and its params in that layout (a copy of the decoder
  weights when they were scanned). bench/decoder.py measures both layouts."""
  if model.config.llm.scan_layers:
    model = model.clone(config=decoding_config(model.config))
  return model, decode_params(model, params)


# ----------------------------------------------------------------------------------------- device parts
def prefill(model: Sphinx, params, tokens, lengths, images, has_image, cache_len: int):
  """Image block + prompts into a fresh cache of `cache_len` slots -> (logits [B, V], cache, position [B]).
  An unscanned decoder gets a per-layer cache (updated in place at each step)."""
  llm = model.config.llm
  cache = init_cache(llm, tokens.shape[0], cache_len, jnp.dtype(model.config.dtype), per_layer=not llm.scan_layers)
  return model.apply({"params": params}, tokens, lengths, cache, images, has_image, method=Sphinx.prefill)


def step(model: Sphinx, params, token, position, cache, key, temperature, top_p):
  """Feeds token int[B] at position int[B] -> (next token int32[B], cache)."""
  logits, cache = model.apply({"params": params}, token[:, None], position[:, None], cache, method=Sphinx.decode)
  return next_token(logits, temperature, top_p, key), cache


def run(model: Sphinx, params, tokens, lengths, images, has_image, key, temperature, top_p, limit, table,
        new_bucket: int):
  """Prefill, then a `lax.while_loop` of single-token steps until every row stopped or `limit` new tokens.

  Returns (new ids int32[B, N], stop_at int32[B]: ids before it are the reply).
  """
  batch, width = tokens.shape[0], table.shape[1]
  image_words = 0 if images is None else model.image_words
  logits, cache, position = prefill(model, params, tokens, lengths, images, has_image,
                                    image_words + tokens.shape[1] + new_bucket)
  # out[:, width - 1 + s] holds new token s; the -2 lead-in lets every window be a plain slice.
  out = jnp.full((batch, width - 1 + new_bucket), -2, jnp.int32)

  def emit(s, out, token, done, stop_at):
    out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], width - 1 + s, axis=1)
    hit, length = match_stop(jax.lax.dynamic_slice_in_dim(out, s, width, axis=1), table)
    return out, done | hit, jnp.where(hit & ~done, s + 1 - length, stop_at)

  key, sub = jax.random.split(key)
  out, done, stop_at = emit(0, out, next_token(logits, temperature, top_p, sub), jnp.zeros((batch,), bool),
                            jnp.full((batch,), limit, jnp.int32))

  def cond(state):
    s, _, _, _, done, _, _ = state
    return (s < limit) & ~jnp.all(done)

  def body(state):
    s, out, cache, position, done, stop_at, key = state
    key, sub = jax.random.split(key)
    token, cache = step(model, params, out[:, width - 2 + s], position, cache, sub, temperature, top_p)
    out, done, stop_at = emit(s, out, token, done, stop_at)
    return s + 1, out, cache, position + 1, done, stop_at, key

  s, out, *_, stop_at, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), out, cache, position, done, stop_at, key))
  return out[:, width - 1:], jnp.minimum(stop_at, s)


# ----------------------------------------------------------------------------------------------- driver
def compiler_options() -> dict | None:
  """The generation programs' XLA options: `CPU_COMPILER_OPTIONS` when compiling for the CPU, else none."""
  return dict(CPU_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else None


class Generator:
  """Jitted generation for one model and its params.

  `generate_ids` / `generate` run a whole batch in one compiled program; `stream` yields text deltas of one
  prompt for a CLI. `traces` counts how often a jitted function was traced (once per shape bucket).
  `tokenizer` None: id-list prompts, no stop strings, no EOS (`generate_ids` only). `unscan_layers`: decode
  with the unscanned layout (`for_decoding`); params assigned later (training evaluation) are unstacked too,
  and the caller may drop its scanned copy to save the memory of the decoder weights. Params that are already
  unscanned ('layers_0/...', what `sphinx_jax.load` holds) always decode unscanned, without a copy.
  """

  def __init__(self, model: Sphinx, params, tokenizer=None, *, buckets: Sequence[int] = BUCKETS,
               max_seq_len: int | None = None, unscan_layers: bool = False):
    if unscan_layers or "layers" not in params["llm"]:  # unscanned params (a loaded handle's) decode as they are
      model, params = for_decoding(model, params)
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.buckets = tuple(buckets)
    self.max_seq_len = max_seq_len or model.config.llm.max_seq_len
    self.traces = 0
    options = compiler_options()
    self._run = jax.jit(self._counted(run), static_argnums=(10,), compiler_options=options)
    self._prefill = jax.jit(self._counted(prefill), static_argnums=(5,), compiler_options=options)
    self._step = jax.jit(self._counted(step), compiler_options=options)

  @property
  def params(self):
    return self._params

  @params.setter
  def params(self, params):
    self._params = decode_params(self.model, params)

  def _need_tokenizer(self, what: str):
    if self.tokenizer is None:
      raise SphinxError(f"generate: {what} needs a tokenizer; build the Generator with one, or pass id lists "
                        "and no stop strings to generate_ids.")
    return self.tokenizer

  def _stop_sequences(self, stops: Sequence[str]) -> list[list[int]]:
    if self.tokenizer is None and not stops:
      return []
    return stop_sequences(self._need_tokenizer("a stop string"), stops)

  def _counted(self, fn):
    def traced(*args):
      self.traces += 1  # runs only while jax traces
      return fn(self.model, *args)
    return traced

  def _prepare(self, prompts, with_image: bool, max_new_tokens: int):
    if isinstance(prompts, str) or not len(prompts):
      raise SphinxError("generate: prompts must be a non-empty list of strings (or of id lists); wrap a single "
                        "prompt in a list.")
    if max_new_tokens < 1:
      raise SphinxError(f"generate: max_new_tokens is {max_new_tokens}; ask for at least 1.")
    image_words = self.model.image_words if with_image else 0
    ids = [self._need_tokenizer("a text prompt").encode(p, bos=True, eos=False) if isinstance(p, str) else list(p)
           for p in prompts]
    ids = [truncate_prompt(p, self.max_seq_len, image_words, max_new_tokens) for p in ids]
    if min(len(p) for p in ids) == 0:
      raise SphinxError("generate: an empty prompt; give at least the BOS token.")
    return pad_prompts(ids, bucket(max(len(p) for p in ids), self.buckets))

  def _images(self, images, has_image, batch):
    if images is None:
      return None, None
    images = jnp.asarray(images)
    if images.shape[0] != batch:
      raise SphinxError(f"generate: {images.shape[0]} images for {batch} prompts; give one per prompt (a dummy "
                        "with has_image False for a text-only row).")
    return images, jnp.ones((batch,), bool) if has_image is None else jnp.asarray(has_image, bool)

  def generate_ids(self, prompts, images=None, has_image=None, *, max_new_tokens: int = 512,
                   temperature: float = 0.0, top_p: float = 0.95, seed: int = 0,
                   stops: Sequence[str] = ()) -> list[list[int]]:
    """New ids per prompt (strings are encoded with BOS), the stop sequence and what follows removed."""
    tokens, lengths = self._prepare(prompts, images is not None, max_new_tokens)
    images, has_image = self._images(images, has_image, len(tokens))
    table = stop_table(self._stop_sequences(stops))
    out, stop_at = self._run(self.params, tokens, lengths, images, has_image, jax.random.key(seed),
                             jnp.float32(temperature), jnp.float32(top_p), jnp.int32(max_new_tokens), table,
                             bucket(max_new_tokens, self.buckets))
    return [row[:n].tolist() for row, n in zip(np.asarray(out), np.asarray(stop_at))]

  def generate(self, prompts, images=None, has_image=None, *, stops: Sequence[str] = SPHINX_STOPS,
               **sampling) -> list[str]:
    """Decoded replies cut before the first stop string. `sampling`: max_new_tokens, temperature, top_p, seed."""
    tokenizer = self._need_tokenizer("text output")
    ids = self.generate_ids(prompts, images, has_image, stops=stops, **sampling)
    return [cut_at_stops(tokenizer.decode(row), stops) for row in ids]

  def stream(self, prompt, image=None, *, max_new_tokens: int = 512, temperature: float = 0.0,
             top_p: float = 0.95, seed: int = 0, stops: Sequence[str] = SPHINX_STOPS) -> Iterator[str]:
    """Text deltas of one reply as it is generated (`stream_generate`); joined, they equal
    `generate([prompt], image[None], ...)[0]` for the same seed. Same stop rules as `generate_ids`, checked on
    the host after every token; text that may still turn into a stop string is held back until it cannot."""
    tokenizer = self._need_tokenizer("streaming")
    tokens, lengths = self._prepare([prompt], image is not None, max_new_tokens)
    images, has_image = self._images(None if image is None else jnp.asarray(image)[None], None, 1)
    image_words = 0 if images is None else self.model.image_words
    cache_len = image_words + tokens.shape[1] + bucket(max_new_tokens, self.buckets)
    logits, cache, position = self._prefill(self.params, tokens, lengths, images, has_image, cache_len)
    temperature, top_p = jnp.float32(temperature), jnp.float32(top_p)
    sequences = stop_sequences(tokenizer, stops)
    key, sub = jax.random.split(jax.random.key(seed))
    token = next_token(logits, temperature, top_p, sub)
    ids, shown = [], 0
    for s in range(max_new_tokens):
      if s:
        key, sub = jax.random.split(key)
        token, cache = self._step(self.params, token, position, cache, sub, temperature, top_p)
        position = position + 1
      ids.append(int(token[0]))
      matched = [len(q) for q in sequences if ids[-len(q):] == q]
      text = tokenizer.decode(ids[:len(ids) - matched[0]] if matched else ids)
      final = cut_at_stops(text, stops)
      if matched or len(final) < len(text):
        if len(final) > shown:
          yield final[shown:]
        return
      visible = len(text) - held_back(text, stops) - text.endswith("\ufffd")  # unfinished multi-byte char
      if visible > shown:
        yield text[shown:visible]
        shown = visible
    if len(text) > shown:
      yield text[shown:]
