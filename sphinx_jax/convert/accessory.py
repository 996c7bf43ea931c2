"""LLaMA2-Accessory SPHINX checkpoints in and out (`sphinx-jax convert --from/--to accessory`).

Mirrors the four-file directory that `accessory/model/meta.py::MetaModel.from_pretrained` reads (SPHINX.md §5):
  consolidated.{rank:02d}-of-{mp:02d}.model.pth   one per model-parallel rank; a bare state dict or
                                                   {"model": state_dict}; every key `llma.`-prefixed, bf16
  config.json      dataclasses.asdict(ModelArgs) of the variant's file (field sets in ACCESSORY_ARGS)
  meta.json        {"llama_type": "llama_ens" | "llama_ens5" | "llama_ens_light" | ... }
  tokenizer.model  sentencepiece

Our tree for the whole model (DESIGN.md "Parameter tree"; '/'-joined paths, nested dicts on disk):
  llm/…                                 decoder; names and transforms in convert/accessory_llm.py
  towers/{qformer,clip,convnext,dinov2}/…  what the tower converters (convert/blip2|clip|convnext|dinov2.py) give
  fusion/visual_proj/{dense/kernel [C, D], dense/bias [D], norm/scale [D], norm/bias [D]}
                                        Linear(C -> D) + LayerNorm(eps 1e-5), C = 5632 (Tiny: 4608)
  fusion/qformer_proj/{same four}       Linear(768 -> D) + LayerNorm; Q-Former variants only
  fusion/start_img, fusion/end_img      [1, 1, D], around every view's tokens
  extras/{tower}/…                      leaves the original stores but never uses (CLIP text leftovers, DINOv2
                                        mask_token and 37x37 table): kept only so export reproduces every key

Model-parallel shards (fairscale rules, accessory/util/tensor_parallel.py; merge = concat in rank order):
  dim 0  ColumnParallelLinear: layers.N.attention.wq|wk|wv.weight, layers.N.feed_forward.w1|w3.weight, output.weight
  dim 1  RowParallelLinear: layers.N.attention.wo.weight, layers.N.feed_forward.w2.weight;
         ParallelEmbedding: tok_embeddings.weight (split over the embedding dim, not the vocab)
  experts  MoE layers.N.feed_forward.w1|w2|w3 (no `.weight`): each rank holds 1/mp of every expert's rows;
         merge = view each shard (E, F/mp, D), concat on axis 1, flatten
  else   replicated; replicas must agree bit for bit.

Config on import: meta.json's llama_type picks the released variant (configs/sphinx.py LLAMA_TYPES); config.json
gives the decoder; every decoder/head tensor must have the shape that config implies. The towers' widths are
fixed by the original code and config.json cannot carry them (ModelArgs(**json) rejects unknown fields), so
they are read off the tensors: each tower's geometry (widths, depths, MLP sizes, grids; see TOWER_GEOMETRY)
must equal that of the variant's released towers or of its tiny CPU twin (`tiny_<variant>`), which also
supplies what shapes cannot tell (head counts). Anything else is refused, naming the key.

Streaming: shards are memory-mapped (convert/torch_io.py). The import first plans every leaf as a `LazyLeaf`:
its source keys are claimed and shape-checked, the towers' tensors are views of the mapped files (replicas
compared on the way), decoder tensors are merged only when their layer is needed, and scanned leaves stay lists
of per-layer pieces until written. `import_accessory` then builds the whole tree in memory (leaves stay views of
the mapped files where no copy is needed); `stream_accessory` hands the leaves to checkpoint.py's chunked writer
(`convert --from accessory --to orbax`), which computes one layer of one leaf at a time and stores it chunk by
chunk, while the shards' resident pages are dropped every RELEASE_BYTES read (they are clean file pages, read
again if needed), so host memory holds about one leaf's source pages plus a few layers rather than the tree.
Export writes one rank's file at a time, so host memory holds the source tree, the towers' re-laid tensors
(their converters return whole dicts), one shard being written and one tensor in flight; decoder tensors are
views, expert matrices are computed when written.
"""
from __future__ import annotations

import concurrent.futures
import functools
import re
import shutil
import threading
from pathlib import Path
from typing import Callable, Mapping

import ml_collections
import ml_dtypes
import numpy as np
from tqdm import tqdm

from configs import sphinx as presets
from sphinx_jax import checkpoint
from sphinx_jax import config as cfg
from sphinx_jax.convert import accessory_llm, blip2, clip, convnext, dinov2, torch_io
from sphinx_jax.errors import SphinxError

PREFIX = "llma."
SHARD_RE = re.compile(r"^consolidated\.(\d{2})-of-(\d{2})\.model\.pth$")
COLUMN = re.compile(r"^(layers\.\d+\.attention\.w[qkv]\.weight|layers\.\d+\.feed_forward\.w[13]\.weight|"
                    r"output\.weight)$")
ROW = re.compile(r"^(layers\.\d+\.attention\.wo\.weight|layers\.\d+\.feed_forward\.w2\.weight|tok_embeddings\.weight)$")
EXPERTS = re.compile(r"^layers\.\d+\.feed_forward\.w[123]$")
RELEASE_BYTES = 256 << 20  # shard bytes read between two drops of the shards' resident pages
KEEP_LAYERS = checkpoint.LOOKAHEAD + 1  # computed layers a streamed leaf holds: what the chunks in flight need

_LLAMA_ARGS = dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=None, vocab_size=-1, multiple_of=256,
                   ffn_dim_multiplier=None, norm_eps=1e-5, rope_theta=10000, max_batch_size=32, max_seq_len=2048,
                   rope_scaling=None, load_pretrained_visual_encoder=False)
_MIXTRAL_ARGS = dict(dim=4096, hidden_dim=16384, head_dim=128, n_layers=32, n_heads=32, n_kv_heads=None,
                     vocab_size=-1, norm_eps=1e-5, rope_theta=1000000, max_batch_size=32, max_seq_len=2048,
                     moe=dict(num_experts_per_tok=2, num_experts=8), load_balancing_weight=0.1, rope_scaling=None,
                     load_pretrained_visual_encoder=False)
# llama_type -> ModelArgs fields and defaults of accessory/model/LLM/<llama_type>.py (commit 3777c439).
ACCESSORY_ARGS = {
    "llama_ens": _LLAMA_ARGS,
    "llama_ens5": _LLAMA_ARGS,
    "llama_ens_light": {**_LLAMA_ARGS, "trainable_mode": "mm_stage2"},
    "llama_ens5_light": {**_LLAMA_ARGS, "trainable_mode": "mm_stage2"},
    "mixtral_sparse_ens": _MIXTRAL_ARGS,
    "mixtral_sparse_ens5": {**_MIXTRAL_ARGS, "load_balancing_weight": 0.01, "trainable_mode": "mm_stage2"},
}


# ------------------------------------------------------------------------------------------ shard rules
def shard_axis(key: str):
  """0 / 1 (concat axis), "experts", or None (replicated) for a merged key without `llma.`."""
  if COLUMN.match(key):
    return 0
  if ROW.match(key):
    return 1
  if EXPERTS.match(key):
    return "experts"
  return None


def check_parts(key: str, specs: list, experts: int | None, files: list) -> None:
  """Refuses per-rank parts [(shape, dtype)] of `key` that cannot merge: different dtypes, split parts that do
  not fit together, replicas of different shapes. Shapes only, so the streamed import checks before writing."""
  (shape0, dtype0), axis = specs[0], shard_axis(key)
  for (shape, dtype), file in zip(specs[1:], files[1:]):
    if np.dtype(dtype) != np.dtype(dtype0):
      raise SphinxError(f"{file}: {PREFIX}{key} is {np.dtype(dtype)}, its part in {files[0]} {np.dtype(dtype0)}; "
                        "the shards come from different checkpoints, use one consistent set.")
    if axis is None and tuple(shape) != tuple(shape0):
      raise SphinxError(f"{file}: replicated tensor {PREFIX}{key} differs from its copy in {files[0]}; the shards "
                        "come from different checkpoints, use one consistent set.")
  if axis == "experts":
    fits = all(len(s) == 2 and s[0] % experts == 0 and s[1] == shape0[1] for s, _ in specs)
  else:
    fits = axis is None or all(len(s) == len(shape0) and all(n == m for i, (n, m) in enumerate(zip(s, shape0))
                                                             if i != axis) for s, _ in specs)
  if not fits:
    raise SphinxError(f"{files[0]}: shards of {PREFIX}{key} do not fit together (shapes "
                      f"{[list(s) for s, _ in specs]}); the shards come from different checkpoints.")


def merge_shards(key: str, parts: list, experts: int | None, files: list) -> np.ndarray:
  """One merged tensor from its per-rank parts (rank order); `files` name the shards for errors."""
  check_parts(key, [(p.shape, p.dtype) for p in parts], experts, files)
  axis = shard_axis(key)
  if axis == "experts":
    merged = np.concatenate([p.reshape(experts, -1, p.shape[-1]) for p in parts], axis=1)
    return merged.reshape(-1, parts[0].shape[-1])
  if axis is not None:
    return np.concatenate(parts, axis=axis)
  for part, file in zip(parts[1:], files[1:]):
    if not np.array_equal(_bits(part), _bits(parts[0])):
      raise SphinxError(f"{file}: replicated tensor {PREFIX}{key} differs from its copy in {files[0]}; the shards "
                        "come from different checkpoints, use one consistent set.")
  return parts[0]


def _bits(a):  # compares bit patterns, so -0.0 vs 0.0 and NaN payloads count as differences
  return a.view(f"u{a.dtype.itemsize}") if a.dtype.kind == "f" or a.dtype == ml_dtypes.bfloat16 else a


def check_split(key: str, shape, mp: int, experts: int | None) -> None:
  """Refuses an --mp that does not divide the split dimension of `key` (shape-only, nothing read)."""
  axis = shard_axis(key)
  if mp == 1 or axis is None:
    return
  if axis == "experts":
    rows = shape[0] // experts
    if rows % mp:
      raise SphinxError(f"{PREFIX}{key}: cannot split {rows} rows per expert over --mp {mp}; choose an --mp that "
                        f"divides {rows}.")
  elif shape[axis] % mp:
    raise SphinxError(f"{PREFIX}{key}: cannot split dim {axis} of size {shape[axis]} over --mp {mp}; choose an "
                      f"--mp that divides {shape[axis]}.")


def split_tensor(key: str, full, mp: int, experts: int | None) -> list:
  """Inverse of `merge_shards`: mp parts in rank order (a replicated tensor is repeated)."""
  check_split(key, full.shape, mp, experts)
  axis = shard_axis(key)
  if mp == 1 or axis is None:
    return [full] * mp
  full = np.asarray(full)
  if axis == "experts":
    per_expert = full.reshape(experts, -1, full.shape[-1])
    return [p.reshape(-1, full.shape[-1]) for p in np.split(per_expert, mp, axis=1)]
  return np.split(full, mp, axis=axis)


# ----------------------------------------------------------------------------------------------- reading
class AccessoryShards(Mapping):
  """The merged, unprefixed state of a checkpoint directory, read one tensor at a time from memory-mapped
  shards. Each key may be claimed once (`remaining` then shows what no converter placed); `bar` ticks per read.
  Reading may run in several threads (the streamed writer's); every RELEASE_BYTES read, the shards' resident
  pages are dropped, so that mapped pages do not pile up in the process's memory."""

  def __init__(self, directory: Path, experts: int | None, bar=None):
    self.directory, self.experts, self.bar = directory, experts, bar
    self.files = [torch_io.PthFile(p) for p in shard_paths(directory)]
    first = self.files[0]
    keys = first.keys()
    for f in self.files[1:]:
      if missing := sorted(set(keys) ^ set(f.keys())):
        holder = first if missing[0] in keys else f
        raise SphinxError(f"{holder.path}: holds {missing[0]!r} but another shard of {directory} does not; the "
                          "shards come from different checkpoints, use one consistent set.")
    for key in keys:
      if not key.startswith(PREFIX):
        raise SphinxError(f"{first.path}: key {key!r} lacks the {PREFIX!r} prefix of a SPHINX checkpoint; this is "
                          "not a LLaMA2-Accessory MetaModel checkpoint.")
    self._keys = [k[len(PREFIX):] for k in keys]
    self.remaining = set(self._keys)
    self._lock, self._unreleased = threading.Lock(), 0
    if bar is not None:
      bar.total = len(self._keys)

  def __iter__(self):
    return iter(self._keys)

  def __len__(self):
    return len(self._keys)

  def __contains__(self, key):
    return key in self.remaining or key in self._keys

  def shape(self, key) -> tuple[int, ...]:
    """Merged shape, from the shards' headers only."""
    shapes = [f.spec(PREFIX + key)[0] for f in self.files]
    axis = shard_axis(key)
    if axis is None or len(shapes) == 1:
      return shapes[0]
    axis = 0 if axis == "experts" else axis
    return tuple(sum(s[axis] for s in shapes) if i == axis else n for i, n in enumerate(shapes[0]))

  def dtype(self, key) -> np.dtype:
    """Stored dtype (of rank 0; `read` refuses shards that disagree), from the header."""
    return np.dtype(self.files[0].spec(PREFIX + key)[1])

  def claim(self, key) -> None:
    """Marks `key` as placed; a key claimed twice, or absent, or whose parts cannot merge is an error naming it."""
    if key not in self.remaining:
      what = "was already used" if key in self._keys else "is missing"
      raise SphinxError(f"{self.directory}: tensor {PREFIX}{key} {what}; the checkpoint does not match its "
                        "meta.json/config.json variant.")
    check_parts(key, [f.spec(PREFIX + key) for f in self.files], self.experts, [f.path for f in self.files])
    self.remaining.discard(key)

  def read(self, key) -> np.ndarray:
    """The merged tensor of `key` (replicas compared bit for bit); a view of rank 0's file when replicated."""
    parts = [f.read(PREFIX + key) for f in self.files]
    merged = merge_shards(key, parts, self.experts, [f.path for f in self.files])
    self.touched(sum(p.nbytes for p in parts))
    if self.bar is not None:
      with self._lock:
        self.bar.update(1)
        if self.bar.n == len(self._keys):  # the streamed import's last read happens inside the writer
          self.bar.close()
    return merged

  def __getitem__(self, key) -> np.ndarray:
    self.claim(key)
    return self.read(key)

  def touched(self, nbytes: int) -> None:
    """Counts mapped bytes read; past RELEASE_BYTES the shards' resident pages are dropped."""
    with self._lock:
      self._unreleased += nbytes
      if self._unreleased < RELEASE_BYTES:
        return
      self._unreleased = 0
    for f in self.files:
      f.release()


class LazyLeaf:
  """One leaf of the imported tree, computed from the shards only when asked for.

  `parts`: one callable per stacked layer (one for an unstacked leaf), each returning that layer in our layout
  (a view of the mapped shards or a merged copy); `shape` is the whole leaf's ([L, ...] when `stacked`).
  `materialize()` gives the whole leaf; `streamed()` a checkpoint.StreamedLeaf whose storage chunks stay within
  one layer, so each layer is computed once for all its chunks; at most KEEP_LAYERS computed layers are held,
  and the leaf lets go of everything after its last chunk. `touched(nbytes)` is told what each layer read.
  """

  def __init__(self, parts, shape, dtype, stacked: bool, touched: Callable[[int], None]):
    self.parts, self.shape, self.dtype, self.stacked = list(parts), tuple(shape), np.dtype(dtype), stacked
    self.touched = touched
    self._lock = threading.Lock()
    self._layers: dict[int, concurrent.futures.Future] = {}  # oldest first
    self._left = int(np.prod(self.shape))  # elements not yet handed to the writer

  def materialize(self) -> np.ndarray:
    if self.stacked:
      return np.stack([part() for part in self.parts])
    return self.parts[0]()

  def streamed(self) -> checkpoint.StreamedLeaf:
    return checkpoint.StreamedLeaf(self.shape, self.dtype, self.fill, split_axes=(0,) if self.stacked else ())

  def fill(self, region: tuple[slice, ...]) -> np.ndarray:
    """A fresh array of `region` (the writer may keep it); region[0] spans one layer of a stacked leaf."""
    if self.stacked:
      chunk = np.stack([self._layer(i)[region[1:]] for i in range(*region[0].indices(self.shape[0]))])
    else:
      chunk = np.array(self._layer(0)[region])
    with self._lock:
      self._left -= chunk.size
      if self._left == 0:
        self._layers.clear()
        self.parts = None  # also frees the towers' per-layer arrays
    return chunk

  def _layer(self, i: int) -> np.ndarray:
    """Part i, computed by the first thread that asks; the others wait for it."""
    with self._lock:
      future = self._layers.get(i)
      mine = future is None
      if mine:
        future = self._layers[i] = concurrent.futures.Future()
        while len(self._layers) > KEEP_LAYERS:
          del self._layers[next(iter(self._layers))]
    if mine:
      try:
        array = self.parts[i]()
        self.touched(array.nbytes)
        future.set_result(array)
      except BaseException as error:
        future.set_exception(error)
    return future.result()


def given(array, touched) -> LazyLeaf:
  """A LazyLeaf over an array the converters already built (a view of the shards, or a small derived table)."""
  return LazyLeaf([lambda: array], np.shape(array), array.dtype, False, touched)


def given_stack(arrays: list, touched) -> LazyLeaf:
  """The towers' `stack`: a stacked LazyLeaf over per-layer arrays, stacked only chunk by chunk."""
  return LazyLeaf([functools.partial(lambda a: a, a) for a in arrays], (len(arrays), *np.shape(arrays[0])),
                  arrays[0].dtype, True, touched)


def shard_paths(directory: Path) -> list[Path]:
  """consolidated.XX-of-YY.model.pth files in rank order; a missing or foreign-count shard is an error."""
  found = {}
  for path in directory.glob("consolidated.*"):
    if m := SHARD_RE.match(path.name):
      found[int(m.group(1))] = (int(m.group(2)), path)
  if not found:
    raise SphinxError(f"{directory}: no consolidated.XX-of-YY.model.pth shards; give a LLaMA2-Accessory "
                      "checkpoint directory.")
  mp = next(iter(found.values()))[0]
  for rank in range(mp):
    if rank not in found:
      raise SphinxError(f"{directory / shard_name(rank, mp)}: missing shard {rank} of {mp}; download it again.")
  if odd := [p for r, (n, p) in sorted(found.items()) if n != mp or r >= mp]:
    raise SphinxError(f"{odd[0]}: does not belong to a {mp}-shard set; remove it or complete its set.")
  return [found[r][1] for r in range(mp)]


def shard_name(rank: int, mp: int) -> str:
  return f"consolidated.{rank:02d}-of-{mp:02d}.model.pth"


def read_llama_type(directory: Path) -> tuple[str, str]:
  """(llama_type, released variant) from meta.json; the first variant wins where two share a file."""
  meta = checkpoint.read_json(directory / "meta.json")
  llama_type = meta.get("llama_type") if isinstance(meta, dict) else None
  variants = [v for v, t in presets.LLAMA_TYPES.items() if t == llama_type]
  if not variants:
    raise SphinxError(f"{directory / 'meta.json'}: unknown llama_type {llama_type!r}; sphinx_jax converts "
                      f"{sorted(set(presets.LLAMA_TYPES.values()))}.")
  return llama_type, variants[0]


def read_model_args(directory: Path, llama_type: str) -> dict:
  """config.json merged over the file's ModelArgs defaults; unknown fields are refused like ModelArgs(**json)."""
  path = directory / "config.json"
  args = checkpoint.read_json(path)
  if not isinstance(args, dict):
    raise SphinxError(f"{path}: not a JSON object; expected dataclasses.asdict(ModelArgs).")
  defaults = ACCESSORY_ARGS[llama_type]
  if unknown := sorted(set(args) - set(defaults)):
    raise SphinxError(f"{path}: field {unknown[0]!r} is not in ModelArgs of {llama_type}; known: {sorted(defaults)}.")
  args = {**defaults, **args}
  for field in ("dim", "n_layers", "n_heads", "multiple_of", "hidden_dim"):
    if field in args and not (isinstance(args[field], int) and args[field] > 0):
      raise SphinxError(f"{path}: {field} is {args[field]!r}; ModelArgs needs a positive integer.")
  moe = args.get("moe", {"num_experts": 1, "num_experts_per_tok": 1})
  if not (isinstance(moe, dict) and all(isinstance(moe.get(f), int) for f in ("num_experts", "num_experts_per_tok"))):
    raise SphinxError(f"{path}: moe is {moe!r}; expected {{'num_experts_per_tok': int, 'num_experts': int}}.")
  return args


def llm_from_args(args: dict, base: ml_collections.ConfigDict, vocab_size: int) -> ml_collections.ConfigDict:
  """Our decoder config from ModelArgs fields; `base` (the preset's) keeps scan/remat/attention settings.

  vocab_size -1 (set by the tokenizer in the original) is taken from tok_embeddings; max_seq_len stays the
  preset's, because MetaModel overrides config.json's value with its own argument too.
  """
  llm = ml_collections.ConfigDict(base.to_dict())
  llm.update(dim=args["dim"], n_layers=args["n_layers"], n_heads=args["n_heads"],
             n_kv_heads=args["n_kv_heads"] or args["n_heads"],
             vocab_size=vocab_size if args["vocab_size"] in (-1, None) else args["vocab_size"],
             norm_eps=args["norm_eps"], rope_theta=float(args["rope_theta"]), rope_scaling=args["rope_scaling"])
  if "moe" in args:
    llm.update(hidden_dim=args["hidden_dim"], moe=dict(num_experts=args["moe"]["num_experts"],
                                                       top_k=args["moe"]["num_experts_per_tok"],
                                                       load_balancing_weight=args["load_balancing_weight"]))
  else:
    llm.update(multiple_of=args["multiple_of"], ffn_dim_multiplier=args["ffn_dim_multiplier"])
  return llm


# ------------------------------------------------------------------------------------------ tower geometry
def _count(keys, pattern) -> int:
  """How many distinct {i} fill `pattern` (a regex with one group) among `keys`."""
  regex = re.compile(pattern)
  return len({m.group(1) for k in keys if (m := regex.match(k))})


# tower -> field -> (shape reader over (shape_of, keys), the key it reads, reader over the tower config)
TOWER_GEOMETRY = {
    "clip": {
        "width": (lambda s, k: s("clip.visual.conv1.weight")[0], "clip.visual.conv1.weight", lambda c: c.width),
        "patch": (lambda s, k: s("clip.visual.conv1.weight")[-1], "clip.visual.conv1.weight", lambda c: c.patch),
        "layers": (lambda s, k: _count(k, r"^clip\.visual\.transformer\.resblocks\.(\d+)\.ln_1\.weight$"),
                   "clip.visual.transformer.resblocks.{i}", lambda c: c.layers),
        "mlp_dim": (lambda s, k: s("clip.visual.transformer.resblocks.0.mlp.c_fc.weight")[0],
                    "clip.visual.transformer.resblocks.0.mlp.c_fc.weight", lambda c: c.mlp_dim),
        "positions": (lambda s, k: s("clip.visual.positional_embedding")[0], "clip.visual.positional_embedding",
                      lambda c: (c.image_size // c.patch) ** 2 + 1),
        "embed_dim": (lambda s, k: s("clip.visual.proj")[-1], "clip.visual.proj", lambda c: c.embed_dim),
        "text": (lambda s, k: (*s("clip.token_embedding.weight"), s("clip.positional_embedding")[0]),
                 "clip.token_embedding.weight", lambda c: (c.text.vocab, c.text.width, c.text.context)),
    },
    "convnext": {
        "dims": (lambda s, k: tuple(s(f"openclip_convnext_xxl.stages.{i}.blocks.0.norm.weight")[0] for i in range(4)),
                 "openclip_convnext_xxl.stages.{s}.blocks.0.norm.weight", lambda c: tuple(c.dims)),
        "depths": (lambda s, k: tuple(_count(k, rf"^openclip_convnext_xxl\.stages\.{i}\.blocks\.(\d+)\.gamma$")
                                      for i in range(4)),
                   "openclip_convnext_xxl.stages.{s}.blocks.{j}", lambda c: tuple(c.depths)),
    },
    "dinov2": {
        "width": (lambda s, k: s("dinov2_vitg14.cls_token")[-1], "dinov2_vitg14.cls_token", lambda c: c.width),
        "depth": (lambda s, k: _count(k, r"^dinov2_vitg14\.blocks\.(\d+)\.norm1\.weight$"),
                  "dinov2_vitg14.blocks.{i}", lambda c: c.depth),
        "mlp_hidden": (lambda s, k: s("dinov2_vitg14.blocks.0.mlp.w3.weight")[-1],
                       "dinov2_vitg14.blocks.0.mlp.w3.weight", lambda c: c.mlp_hidden),
        "patch": (lambda s, k: s("dinov2_vitg14.patch_embed.proj.weight")[-1], "dinov2_vitg14.patch_embed.proj.weight",
                  lambda c: c.patch),
        "positions": (lambda s, k: s("dinov2_vitg14.pos_embed")[1], "dinov2_vitg14.pos_embed",
                      lambda c: c.pos_grid ** 2 + 1),
    },
    "qformer": {
        "vision_width": (lambda s, k: s("qformer.vision_model.embeddings.class_embedding")[-1],
                         "qformer.vision_model.embeddings.class_embedding", lambda c: c.vision.width),
        "vision_layers": (lambda s, k: _count(k, r"^qformer\.vision_model\.encoder\.layers\.(\d+)\.layer_norm1\."),
                          "qformer.vision_model.encoder.layers.{i}", lambda c: c.vision.layers),
        "vision_mlp": (lambda s, k: s("qformer.vision_model.encoder.layers.0.mlp.fc1.weight")[0],
                       "qformer.vision_model.encoder.layers.0.mlp.fc1.weight", lambda c: c.vision.mlp_dim),
        "hidden": (lambda s, k: s("qformer.qformer.layernorm.weight")[0], "qformer.qformer.layernorm.weight",
                   lambda c: c.qformer.hidden),
        "layers": (lambda s, k: _count(k, r"^qformer\.qformer\.encoder\.layer\.(\d+)\.attention\.output\.dense\."),
                   "qformer.qformer.encoder.layer.{i}", lambda c: c.qformer.layers),
        "intermediate": (lambda s, k: s("qformer.qformer.encoder.layer.0.intermediate_query.dense.weight")[0],
                         "qformer.qformer.encoder.layer.0.intermediate_query.dense.weight",
                         lambda c: c.qformer.intermediate),
        "queries": (lambda s, k: s("qformer.query_tokens")[1], "qformer.query_tokens", lambda c: c.num_query_tokens),
    },
}


def tower_geometry(tower: str, shape_of: Callable, keys) -> dict:
  """{field: value} read off the tensors; a tensor the reader needs and cannot find is named."""
  out = {}
  for field, (read, key, _) in TOWER_GEOMETRY[tower].items():
    try:
      out[field] = read(shape_of, keys)
    except (KeyError, IndexError):
      raise SphinxError(f"tensor {PREFIX}{key} missing or malformed; the {tower} tower of this checkpoint is "
                        "incomplete.") from None
  return out


def pick_tower(tower: str, found: dict, released, tiny) -> ml_collections.ConfigDict:
  """The tower config (released or tiny twin) whose geometry equals `found`; else the first field that differs
  from the closer of the two is named, with its key."""
  geometry = TOWER_GEOMETRY[tower]

  def misses(c):
    return [f for f, (_, _, want) in geometry.items() if found[f] != want(c)]

  closest = min((released, tiny), key=lambda c: len(misses(c)))
  if not misses(closest):
    return closest
  field = misses(closest)[0]
  _, key, want = geometry[field]
  raise SphinxError(f"tensor {PREFIX}{key}: {tower} {field} is {found[field]}, neither the released tower's "
                    f"{want(released)} nor the tiny twin's {want(tiny)}; only those tower geometries are supported.")


def stored_vocab(shards: AccessoryShards) -> int:
  """Rows of tok_embeddings (the original sets vocab_size from its tokenizer); -1 when the tensor is absent."""
  return shards.shape("tok_embeddings.weight")[0] if "tok_embeddings.weight" in shards.remaining else -1


def resolve_config(variant: str, args: dict, shards: AccessoryShards) -> ml_collections.ConfigDict:
  """Our full config: the variant's preset (or its tiny twin when every tower is tiny), decoder from config.json."""
  released, tiny = presets.variant_config(variant), presets.variant_config(f"tiny_{variant}")
  keys = shards.keys()

  def shape_of(key):
    if key not in shards.remaining:
      raise KeyError(key)
    return shards.shape(key)

  chosen = {t: pick_tower(t, tower_geometry(t, shape_of, keys), released.model[t], tiny.model[t])
            for t in released.model.towers}
  all_tiny = all(chosen[t] is tiny.model[t] for t in chosen)
  config = tiny if all_tiny and chosen else released
  for t, c in chosen.items():
    config.model[t] = c
  config.model.llm = llm_from_args(args, config.model.llm, stored_vocab(shards))
  try:
    cfg.validate(config)
  except SphinxError as error:
    raise SphinxError(f"{shards.directory / 'config.json'}: {error}") from None
  return config


def check_shapes(shards: AccessoryShards, model, directory: Path) -> None:
  """Every decoder/head tensor has the shape config.json implies (and exists)."""
  for key, want in accessory_llm.expected_shapes(model).items():
    if key not in shards.remaining:
      raise SphinxError(f"{directory}: tensor {PREFIX}{key} is missing; a {model.llama_type} checkpoint needs it.")
    if (got := tuple(shards.shape(key))) != want:
      raise SphinxError(f"{directory / 'config.json'}: implies {PREFIX}{key} of shape {list(want)}, the shards "
                        f"hold {list(got)}; config.json does not match the tensors.")


# ------------------------------------------------------------------------------------------------ towers
# tower -> (key prefix in the original, after `llma.`; the converter that owns the tower's key map)
TOWERS = {"qformer": ("qformer.", blip2), "clip": ("clip.", clip), "convnext": ("openclip_convnext_xxl.", convnext),
          "dinov2": ("dinov2_vitg14.", dinov2)}


def towers_to_ours(state: Mapping, model, stack: Callable = np.stack) -> dict:
  """Flat `towers/{t}/…` and `extras/{t}/…` leaves from the merged state, through the per-tower converters;
  `stack` builds their scanned leaves from per-layer arrays."""
  flat = {}
  for tower in model.towers:
    prefix, converter = TOWERS[tower]
    params, extras = converter.to_ours(state, model[tower], prefix=prefix, stack=stack)
    flat.update({f"towers/{tower}/{p}": v for p, v in checkpoint.flatten(params).items()})
    flat.update({f"extras/{tower}/{p}": v for p, v in checkpoint.flatten(extras).items()})
  return flat


def towers_to_accessory(flat: dict, model) -> dict:
  """{merged key: array} of every tower, popping `towers/{t}/…` and `extras/{t}/…` from `flat`."""
  state = {}
  for tower in model.towers:
    prefix, converter = TOWERS[tower]
    params = checkpoint.unflatten(_pop_prefix(flat, f"towers/{tower}/"))
    extras = checkpoint.unflatten(_pop_prefix(flat, f"extras/{tower}/"))
    state.update(converter.to_torch(params, extras, model[tower], prefix=prefix))
  return state


def _pop_prefix(flat, prefix):
  return {k[len(prefix):]: flat.pop(k) for k in [k for k in flat if k.startswith(prefix)]}


# --------------------------------------------------------------------------------------------- import
def _stand_in(shape):  # zero-stride array: transforms give their output shape without touching memory
  return np.broadcast_to(np.zeros((), np.float32), shape)


def _read_as(shards: AccessoryShards, key: str, to: Callable, experts) -> np.ndarray:
  return to(shards.read(key), experts)


def decoder_leaves(shards: AccessoryShards, model) -> dict[str, LazyLeaf]:
  """Lazy `llm/…` and `fusion/…` leaves (accessory_llm.sources): keys are claimed now, merged when needed."""
  experts = accessory_llm.experts(model.llm)
  leaves = {}
  for path, (keys, to, stacked) in accessory_llm.sources(model).items():
    for key in keys:
      shards.claim(key)
    shape = to(_stand_in(shards.shape(keys[0])), experts).shape
    if shard_axis(keys[0]) is None:  # replicated (views): compared now, so that bad shards fail before writing
      parts = [functools.partial(lambda a: a, _read_as(shards, key, to, experts)) for key in keys]
    else:
      parts = [functools.partial(_read_as, shards, key, to, experts) for key in keys]
    leaves[path] = LazyLeaf(parts, (len(keys), *shape) if stacked else shape, shards.dtype(keys[0]), stacked,
                            shards.touched)
  return leaves


def tower_leaves(shards: AccessoryShards, model) -> dict[str, LazyLeaf]:
  """Lazy `towers/…` and `extras/…` leaves: the converters run now, on views of the mapped shards."""
  flat = towers_to_ours(shards, model, functools.partial(given_stack, touched=shards.touched))
  return {p: v if isinstance(v, LazyLeaf) else given(v, shards.touched) for p, v in flat.items()}


def plan_import(src, scan_layers: bool | None = None, config=None, bar=None):
  """({flat path: LazyLeaf}, resolved config, tokenizer path) of a LLaMA2-Accessory SPHINX directory.

  Every check (files, config, shapes, replicas of the towers, no leftover tensor) runs here; what remains for
  the leaves is reading and merging the decoder's tensors and copying. `scan_layers` None keeps the preset's
  layout. `config` (a full config whose towers have a geometry no preset has, e.g. released widths at a few
  layers for tools/accessory_acceptance.py) replaces the preset the tensors would pick; its decoder still comes
  from config.json, and every tensor must fit it. `bar` (tqdm) ticks per tensor read.
  """
  directory = Path(src)
  if not directory.is_dir():
    raise SphinxError(f"{directory}: no such directory; --from accessory takes a LLaMA2-Accessory checkpoint "
                      "directory (consolidated.XX-of-YY.model.pth, config.json, meta.json, tokenizer.model).")
  llama_type, variant = read_llama_type(directory)
  args = read_model_args(directory, llama_type)
  tokenizer = directory / "tokenizer.model"
  if not tokenizer.is_file():
    raise SphinxError(f"{tokenizer}: missing; a LLaMA2-Accessory checkpoint directory carries its tokenizer.")
  shards = AccessoryShards(directory, args["moe"]["num_experts"] if "moe" in args else None, bar)
  if config is None:
    config = resolve_config(variant, args, shards)
  else:
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.llm = llm_from_args(args, config.model.llm, stored_vocab(shards))
    cfg.validate(config)
  if scan_layers is not None:
    config.model.llm.scan_layers = scan_layers
  check_shapes(shards, config.model, directory)
  leaves = decoder_leaves(shards, config.model)
  leaves.update(tower_leaves(shards, config.model))
  if shards.remaining:
    left = sorted(shards.remaining)
    raise SphinxError(f"{directory}: no place for {len(left)} tensor(s) such as {PREFIX}{left[0]}; the checkpoint "
                      f"holds more than a {llama_type} model.")
  return leaves, config, tokenizer


def _bar(src, progress: bool):
  return tqdm(total=None, unit="tensor", desc=f"reading {Path(src).name}", disable=not progress)


def import_accessory(src, scan_layers: bool | None = None, progress: bool = True, config=None):
  """(params nested dict, resolved config, tokenizer path) of a LLaMA2-Accessory SPHINX directory (arguments
  as `plan_import`). Leaves are numpy arrays in the stored dtype (bf16), still backed by the memory-mapped
  shards where the transform is a view."""
  with _bar(src, progress) as bar:
    leaves, config, tokenizer = plan_import(src, scan_layers, config, bar)
    params = {path: leaf.materialize() for path, leaf in leaves.items()}
  return checkpoint.unflatten(params), config, tokenizer


def stream_accessory(src, scan_layers: bool | None = None, progress: bool = True, config=None):
  """({flat path: checkpoint.StreamedLeaf}, resolved config, tokenizer path): `plan_import`'s leaves for
  checkpoint.save_model_dir, which reads, merges, stacks and writes them one layer at a time. The progress bar
  (tensors read) advances while the writer runs."""
  bar = _bar(src, progress)
  try:
    leaves, config, tokenizer = plan_import(src, scan_layers, config, bar)
  except BaseException:
    bar.close()
    raise
  return {path: leaf.streamed() for path, leaf in leaves.items()}, config, tokenizer


# --------------------------------------------------------------------------------------------- export
def llama_type_of(model) -> str:
  llama_type = model.get("llama_type") or presets.LLAMA_TYPES.get(model.get("variant"))
  if llama_type not in ACCESSORY_ARGS:
    raise SphinxError(f"config.model.llama_type {llama_type!r}: not a SPHINX variant LLaMA2-Accessory can load; "
                      f"known: {sorted(ACCESSORY_ARGS)}.")
  return llama_type


def model_args(model) -> dict:
  """config.json: dataclasses.asdict(ModelArgs) of the variant's file, fields in the file's order."""
  llm, llama_type = model.llm, llama_type_of(model)
  values = dict(dim=llm.dim, n_layers=llm.n_layers, n_heads=llm.n_heads,
                n_kv_heads=None if llm.n_kv_heads == llm.n_heads else llm.n_kv_heads, vocab_size=llm.vocab_size,
                norm_eps=llm.norm_eps, rope_theta=llm.rope_theta, max_seq_len=llm.max_seq_len,
                rope_scaling=llm.rope_scaling)
  if llm.get("moe"):
    values.update(hidden_dim=cfg.ffn_hidden_dim(llm), head_dim=llm.dim // llm.n_heads,
                  moe=dict(num_experts_per_tok=llm.moe.top_k, num_experts=llm.moe.num_experts),
                  load_balancing_weight=llm.moe.load_balancing_weight)
  else:
    values.update(multiple_of=llm.multiple_of, ffn_dim_multiplier=llm.ffn_dim_multiplier)
  return {field: values.get(field, default) for field, default in ACCESSORY_ARGS[llama_type].items()}


def accessory_state(params, model) -> dict:
  """Merged, unprefixed accessory state {key: array} of our params; every leaf must find its key."""
  flat = dict(checkpoint.flatten(params))
  state = dict(accessory_llm.to_accessory(flat, model))
  state.update(towers_to_accessory(flat, model))
  if flat:
    left = sorted(flat)
    raise SphinxError(f"parameter tree: no LLaMA2-Accessory key for {len(left)} leaf/leaves such as {left[0]!r}; "
                      "the tree does not match its config.")
  for key, want in accessory_llm.expected_shapes(model).items():  # the towers' converters check their own
    if tuple(state[key].shape) != want:
      raise SphinxError(f"parameter tree: the leaf for {PREFIX}{key} gives shape {list(state[key].shape)}, the "
                        f"model config needs {list(want)}; export with the config the tree was built from.")
  return state


def _bf16(array):
  return np.asarray(array).astype(ml_dtypes.bfloat16)


def export_accessory(params, config, tokenizer, dst, mp: int = 1, overwrite: bool = False,
                     progress: bool = True) -> Path:
  """Writes the four-file directory at `dst` (bf16 tensors, `llma.` keys, mp shards); nothing on failure."""
  model = config.model
  llama_type = llama_type_of(model)
  if mp < 1:
    raise SphinxError(f"--mp {mp}: the model-parallel size must be a positive integer.")
  if tokenizer is None or not Path(tokenizer).is_file():
    raise SphinxError(f"{tokenizer}: no tokenizer.model to write; LLaMA2-Accessory needs one beside the shards.")
  experts = model.llm.moe.num_experts if model.llm.get("moe") else None
  state = accessory_state(params, model)
  for key, value in state.items():  # every split checked before anything is written
    check_split(key, value.shape, mp, experts)
  with checkpoint.staged_dir(dst, overwrite) as tmp:
    for rank in range(mp):  # one rank's file at a time: host memory holds one shard
      items = ((PREFIX + k, _bf16(split_tensor(k, v, mp, experts)[rank])) for k, v in state.items())
      torch_io.save_pth(tmp / shard_name(rank, mp), tqdm(items, total=len(state), unit="tensor",
                                                          desc=f"writing {shard_name(rank, mp)}", disable=not progress))
    checkpoint.write_json(tmp / "config.json", model_args(model))
    checkpoint.write_json(tmp / "meta.json", {"llama_type": llama_type})
    shutil.copyfile(tokenizer, tmp / "tokenizer.model")
  return Path(dst)
