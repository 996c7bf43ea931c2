"""Configuration schema: the pieces every preset is built from, and `validate(config)`.

Configs are `ml_collections.ConfigDict`s returned by `configs/<file>.py:get_config(arg)`. This module holds
the shared building blocks (full-size values from ../shared/SPHINX.md, tiny CPU twins with the same structure)
and the checks run at start-up; the released variants themselves are tables in `configs/sphinx.py`.

Layout of a config:
  model.llm       decoder (LLaMA-2 / TinyLlama; `moe` for Mixtral)
  model.towers    tuple of tower names in use, in the original's fusion order
  model.clip | convnext | dinov2 | qformer    one sub-config per tower
  model.image_size, model.views, model.dtype, model.param_dtype
  mesh            axis sizes ('data', 'fsdp', 'tensor', 'expert'); -1 = the rest
  rules           logical -> mesh axis table (sharding.DEFAULT_RULES when None)
"""
from __future__ import annotations

import ml_collections

from sphinx_jax.errors import SphinxError

TOWER_ORDER = ("qformer", "clip", "convnext", "dinov2")  # qformer tokens first; [clip|convnext|dinov2] channels
REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch", "save_qkv_proj", "save_qkv_mlp")
ATTENTION_BACKENDS = ("xla", "cudnn", "splash")
MOE_DISPATCHES = ("auto", "dense", "grouped", "blocked", "expert_parallel")  # models/moe.py


def llm_config(**overrides) -> ml_collections.ConfigDict:
  """LLaMA-2-13B decoder (SPHINX.md §2.1); overrides give TinyLlama, Mixtral or tiny twins."""
  c = ml_collections.ConfigDict(dict(
      vocab_size=32000, dim=5120, n_layers=40, n_heads=40, n_kv_heads=40,
      multiple_of=256, ffn_dim_multiplier=None, hidden_dim=None,  # hidden_dim fixes the FFN width (Mixtral)
      norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, max_seq_len=4096,
      moe=None,  # ConfigDict(num_experts, top_k, load_balancing_weight, dispatch) for Mixtral
      scan_layers=True, remat_policy="none", attention="xla",
      causal_blocks=4,  # query row blocks of the attention without a KV cache (layers.causal_query_blocks)
  ))
  c.update(overrides)
  return c


def tinyllama_config(**overrides):
  """TinyLlama-1.1B (SPHINX-Tiny): GQA with 4 KV heads."""
  return llm_config(**{**dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4), **overrides})


def mixtral_config(**overrides):
  """Mixtral-8x7B (SPHINX-MoE, SPHINX.md §2.2): 8 experts, top-2, rope theta 1e6.

  `moe` overrides merge into the default; `moe.dispatch` is models/moe.py's 'auto' (the default: picks one of
  the next for the platform and mesh the program is built for), 'grouped' (sorted tokens, ragged matmuls),
  'dense' (every expert on every token, the reference), 'blocked' (padded expert blocks, per-expert loops over
  weights read in place: the fast one on CPU) or 'expert_parallel' (all-to-all over the mesh's
  expert axis; `capacity_factor` 0 = lossless buffers, f > 0 drops copies past f x the even share).
  """
  moe = {**dict(num_experts=8, top_k=2, load_balancing_weight=0.0, dispatch="auto", capacity_factor=0.0),
         **overrides.pop("moe", {})}
  return llm_config(**{**dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, rope_theta=1e6,
                              moe=moe), **overrides})


def ffn_hidden_dim(llm) -> int:
  """FFN width rule of the original: int(2*4*dim/3), times ffn_dim_multiplier, rounded up to multiple_of.

  13B: int(2*20480/3) = 13653 -> 13824; TinyLlama: 5461 -> 5632. `hidden_dim` set explicitly wins.
  """
  if llm.get("hidden_dim"):
    return int(llm.hidden_dim)
  hidden = int(2 * (4 * llm.dim) / 3)
  if llm.get("ffn_dim_multiplier") is not None:
    hidden = int(llm.ffn_dim_multiplier * hidden)
  return llm.multiple_of * ((hidden + llm.multiple_of - 1) // llm.multiple_of)


def clip_config(**overrides):
  """open_clip ViT-L/14 visual tower (SPHINX.md §3.2). `act` is 'gelu' (current loader) or 'quick_gelu'."""
  c = ml_collections.ConfigDict(dict(width=1024, layers=24, heads=16, mlp_dim=4096, patch=14, image_size=224,
                                     eps=1e-5, act="gelu", embed_dim=768, scan=True,
                                     text=dict(vocab=49408, context=77, width=768)))
  c.update(overrides)
  return c


def convnext_config(**overrides):
  """timm convnext_xxlarge trunk (SPHINX.md §3.3); `input_size` 256 (224 views upsampled) or 512."""
  c = ml_collections.ConfigDict(dict(depths=(3, 4, 30, 3), dims=(384, 768, 1536, 3072), eps=1e-5,
                                     input_size=256, scan=True))
  c.update(overrides)
  return c


def dinov2_config(**overrides):
  """DINOv2 ViT-g/14 hub model, no registers (SPHINX.md §3.5); `pos_grid` is the stored 37x37 table."""
  c = ml_collections.ConfigDict(dict(width=1536, depth=40, heads=24, mlp_hidden=4096, patch=14, image_size=224,
                                     pos_grid=37, interpolate_offset=0.1, eps=1e-6, scan=True))
  c.update(overrides)
  return c


def qformer_config(**overrides):
  """BLIP-2 (opt-2.7b config) EVA ViT-g/14 + Q-Former (SPHINX.md §3.4)."""
  c = ml_collections.ConfigDict(dict(
      vision=dict(width=1408, layers=39, heads=16, mlp_dim=6144, patch=14, image_size=224, eps=1e-6),
      qformer=dict(hidden=768, layers=12, heads=12, intermediate=3072, cross_attention_frequency=2, eps=1e-12),
      num_query_tokens=32, scan=True))
  c.update(overrides)
  return c


TOWER_BUILDERS = {"clip": clip_config, "convnext": convnext_config, "dinov2": dinov2_config,
                  "qformer": qformer_config}


def model_config(llm, towers, image_size, views, **overrides):
  """A whole SPHINX model config: decoder, towers in use, resolution and views.

  train_towers: gradients flow into the towers (the original freezes them: pretrained encoders); set it with the
  `all` trainable preset when the towers start from random weights, as in the demo.
  """
  c = ml_collections.ConfigDict(dict(llm=llm, towers=tuple(towers), image_size=image_size, views=views,
                                     dtype="bfloat16", param_dtype="float32", train_towers=False))
  for name in TOWER_BUILDERS:
    c[name] = TOWER_BUILDERS[name]()
  c.update(overrides)
  return c


def base_config(model) -> ml_collections.ConfigDict:
  """Top-level config around a model config: mesh, rules, seed, and the train / data / eval sections."""
  return ml_collections.ConfigDict(dict(
      model=model, seed=0,
      mesh=dict(data=1, fsdp=-1, tensor=1, expert=1),
      rules=None,
      train=train_config(), data=data_config(), eval=eval_config(),
  ))


def dataset_config(kind, path, ratio=1.0, **fields) -> ml_collections.ConfigDict:
  """One named dataset of `data.datasets` (readers in data/sources.py).

  kind: conversations | coco | vqav2 | text | arrayrecord | synthetic. path: the JSON/JSONL file, COCO
  annotations, VQAv2 questions, text file/folder, or prepared directory ("" for synthetic). fields: image_root,
  task (coco: detection | rec | reg | pose | layout; synthetic: a world task or a tuple of them), refs (coco
  rec/reg), annotations (vqav2), split (arrayrecord), group (image | text; default text for kind text or as_text,
  else image), seed / domain / length / turns / max_objects / object_sides / as_text (synthetic: the world's seed,
  "flat" | "textured", records per epoch, questions per record, shapes per scene at most, (lo, hi) side of a shape
  as a fraction of the image's shorter side, the scene described in words instead of shown).
  """
  c = ml_collections.ConfigDict(dict(kind=kind, path=path, ratio=float(ratio), image_root=None, task=None,
                                     refs=None, annotations=None, split=None, group=None, seed=None, domain=None,
                                     length=None, turns=None, max_objects=None, object_sides=None,
                                     as_text=None))
  c.update(fields)
  return c


def data_config(**overrides) -> ml_collections.ConfigDict:
  """The `data` section: the mixture and batching of data/pipeline.py (SPHINX.md §6).

  max_len is the original's max_words: text + image tokens per row. group_batches draws every global batch
  from one group (image-text or text-only), as the original's sampler. max_bad_fraction aborts the run when
  more records than that were skipped, once bad_fraction_min_records have been seen. prefetch: batches each
  worker keeps ready, and rows it reads ahead (in batches); read_threads: threads per worker reading records
  (more for storage that makes reads wait, e.g. ArrayRecord on GCS).
  """
  c = ml_collections.ConfigDict(dict(
      datasets={}, tokenizer="", global_batch_size=32, max_len=4096, group_batches=True, pack_text=False,
      seed=0, num_workers=2, prefetch=2, read_threads=2, max_bad_fraction=0.05, bad_fraction_min_records=1000,
      epochs=None,  # None: repeat forever (training); N: stop after N passes (evaluation, tests)
  ))
  c.update(overrides)
  return c


SPHINX_GRID = 16  # every released variant: 224-px views at patch 14


def vit_grids(model) -> dict:
  """{field: side of its patch grid} of the ViT towers feeding the fused [CLIP | ConvNeXt | DINOv2] stream."""
  return {f"model.{t}.patch": model[t].image_size // model[t].patch for t in ("clip", "dinov2") if t in model.towers}


def patch_grid(model) -> int:
  """Side of the token grid the fused stream shares (ConvNeXt's map is repeated up to it): 16 in every released
  variant; a coarser ViT patch gives fewer image tokens (the demo's patch 28: 8)."""
  return next(iter(vit_grids(model).values()), SPHINX_GRID)


def image_tokens(model) -> int:
  """Visual positions of the variant: 291 x views with the Q-Former (SPHINX), 259 x views without (Tiny), 0 for a
  text-only model (no towers); 2 tags + queries + class token + patch_grid^2 per view."""
  if not model.towers:
    return 0
  qformer = model.qformer.num_query_tokens if "qformer" in model.towers else 0
  return model.views * (2 + qformer + 1 + patch_grid(model) ** 2)


def _check(cond, field, message):
  if not cond:
    raise SphinxError(f"config.{field}: {message}")


TOWERS_TRAINED_BY = "all"  # the train/optimizer.py preset whose patterns include towers/


def validate(config, num_devices: int | None = None, *, training: bool = False) -> None:
  """Rejects inconsistent settings before anything is traced; the message names the field at fault.

  training: also check the train section against the model (the trainer and `sphinx-jax compile`).
  """
  model = config.model
  llm = model.llm
  _check(llm.dim % llm.n_heads == 0, "model.llm.n_heads", f"{llm.n_heads} heads do not divide dim {llm.dim}; "
         "choose n_heads dividing dim.")
  _check(llm.n_heads % llm.n_kv_heads == 0, "model.llm.n_kv_heads",
         f"{llm.n_kv_heads} KV heads do not divide {llm.n_heads} query heads; choose a divisor.")
  _check(llm.remat_policy in REMAT_POLICIES, "model.llm.remat_policy",
         f"unknown policy {llm.remat_policy!r}; use one of {REMAT_POLICIES}.")
  blocks = llm.get("causal_blocks", 1)
  _check(isinstance(blocks, int) and blocks >= 1, "model.llm.causal_blocks",
         f"{blocks!r}; use a whole number >= 1 (1: no blocks).")
  _check(llm.attention in ATTENTION_BACKENDS, "model.llm.attention",
         f"unknown backend {llm.attention!r}; use one of {ATTENTION_BACKENDS}.")
  if llm.get("moe"):
    _check(llm.moe.get("dispatch") in MOE_DISPATCHES, "model.llm.moe.dispatch",
           f"unknown dispatch {llm.moe.get('dispatch')!r}; use one of {MOE_DISPATCHES}.")
    _check(0 < llm.moe.top_k <= llm.moe.num_experts, "model.llm.moe.top_k",
           f"{llm.moe.top_k} experts per token out of {llm.moe.num_experts}; choose 1..num_experts.")
    _check(llm.moe.get("capacity_factor", 0.0) >= 0, "model.llm.moe.capacity_factor",
           f"{llm.moe.get('capacity_factor')}; use 0 (lossless) or a positive factor such as 1.25.")
  unknown = [t for t in model.towers if t not in TOWER_BUILDERS]
  _check(not unknown, "model.towers", f"unknown tower(s) {unknown}; known: {sorted(TOWER_BUILDERS)}.")
  _check(model.views in (1, 5), "model.views", f"{model.views} views; SPHINX uses 1 or 5.")
  grids = vit_grids(model)
  if len(set(grids.values())) > 1:
    raise SphinxError(f"config.{list(grids)[-1]}: the ViT towers' patch grids differ ({grids}); their tokens are "
                      "concatenated channel-wise, so choose patches giving one grid.")
  if model.towers:
    needed = image_tokens(model) + 1
    _check(llm.max_seq_len >= needed, "model.llm.max_seq_len",
           f"{llm.max_seq_len} is smaller than the {needed - 1} image tokens + BOS of this variant; raise it.")
  if training:
    _check(bool(model.get("train_towers")) == (config.train.trainable == TOWERS_TRAINED_BY), "model.train_towers",
           f"{model.get('train_towers')} with train.trainable={config.train.trainable!r}; the towers train only "
           f"with both model.train_towers=True and train.trainable={TOWERS_TRAINED_BY!r}: set both or neither.")
    _check_profile_window(config.train)
  if num_devices is not None:
    from sphinx_jax.sharding import mesh_shape
    mesh_shape(config.mesh, num_devices)


def _check_profile_window(train) -> None:
  start, count = train.get("profile_at", 0), train.get("profile_steps", 1)
  _check(isinstance(start, int) and 0 <= start <= train.num_steps, "train.profile_at",
         f"{start!r}; use 0 (no trace) or a step in 1..train.num_steps={train.num_steps}.")
  _check(isinstance(count, int) and count >= 1 and (not start or start + count - 1 <= train.num_steps),
         "train.profile_steps",
         f"{count!r} steps from train.profile_at={start} pass train.num_steps={train.num_steps}; trace fewer.")


def train_config(**overrides) -> ml_collections.ConfigDict:
  """The `train` section (SPHINX.md §8 defaults of the fine-tuning recipe; steps instead of epochs).

  trainable: a preset of train/optimizer.py TRAINABLE_PRESETS (stage1, stage2, mm_stage1, llm, all).
  peak_flops: per-device peak FLOP/s for the MFU metric (0 = not logged).
  eval_at_start: with eval_every, also evaluate the untrained model before step 1 of a fresh run (the baseline).
  export_to: when set, the final params are also written there as a model directory (train/export.py), ready
    for `mix`, `load` and `init_from`.
  towers_from: a model directory whose `towers` tree replaces the initial towers (fresh or from `init_from`):
    pretrained encoders for a new model.
  llm_from: the same for the `llm` tree: a pretrained decoder (a converted LLaMA, a text-only run's export) for a
    new model whose fusion starts fresh.
  profile_at, profile_steps: trace steps profile_at .. profile_at + profile_steps - 1 (1-based; 0 = no trace) with
    jax.profiler into WORKDIR/tensorboard (TensorBoard's Profile tab; a Perfetto trace beside it) and write a
    summary of the step's XLA op time per model scope there (train/profile.py). Start past the first step, whose
    time is the compile's.
  cpu_library_fusions: on the CPU, let XLA hand the step's products to YNNPACK (its default). Off, XLA's own dot
    emitter runs them: faster for a small model's few-column products (configs/demo.py), slower for wide ones
    (BENCHMARKS.md). Ignored on other devices.
  """
  c = ml_collections.ConfigDict(dict(
      num_steps=1000, lr=2e-5, min_lr=0.0, warmup_steps=30, weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-8,
      clip_grad=8.0, accum_steps=1, trainable="stage2", init_from="", log_every=10, eval_every=0,
      eval_at_start=False, checkpoint_every=500, keep_checkpoints=3, keep_period=0, max_nonfinite_in_row=10, peak_flops=0.0,
      export_to="", towers_from="", llm_from="", cpu_library_fusions=True, profile_at=0, profile_steps=3,
  ))
  c.update(overrides)
  return c


def eval_config(**overrides) -> ml_collections.ConfigDict:
  """The `eval` section of training: held-out synthetic-world samples scored by train/evaluation.py."""
  c = ml_collections.ConfigDict(dict(tasks=("vqa", "rec"), num_samples=64, world_seed=10_000, domain="flat",
                                     max_objects=5, object_sides=None, max_new_tokens=24, batch=16, num_drawn=4))
  c.update(overrides)
  return c


def load_config(spec: str, overrides=()) -> ml_collections.ConfigDict:
  """`configs/<file>.py[:<arg>]` -> get_config(arg), then `--config.a.b=value` overrides applied in order.

  Values are Python literals (`3`, `1e-4`, `(1, 2)`, `'x'`) or bare strings; a field that does not exist or a
  value of the wrong type is a SphinxError naming the field.
  """
  import ast
  import importlib.util
  import os

  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise SphinxError(f"--config {path}: no such file; give configs/<file>.py[:<preset>].")
  module_spec = importlib.util.spec_from_file_location(f"_sphinx_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except ValueError as error:
    raise SphinxError(str(error)) from None
  for item in overrides:
    name, eq, raw = item.removeprefix("--config.").partition("=")
    if not eq:
      raise SphinxError(f"{item}: overrides look like --config.a.b=value.")
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    *parents, leaf = name.split(".")
    node = config
    for part in parents:
      if part not in node:
        raise SphinxError(f"--config.{name}: config has no field {part!r}; check the name.")
      node = node[part]
    if leaf not in node:
      raise SphinxError(f"--config.{name}: config has no field {leaf!r}; check the name.")
    try:
      node[leaf] = value
    except TypeError as error:
      raise SphinxError(f"--config.{name}={raw}: {error}") from None
  return config
