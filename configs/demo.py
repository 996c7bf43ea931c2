"""The demo: a tiny SPHINX (all four towers, 1 view at 224 px, patch 28, a 4-layer decoder) trained on the
synthetic world's task mixture (scenes of 1-3 shapes of 0.25-0.45 of the shorter side, up to 4 questions per image:
VQA, REC (part of it on one-shape scenes), REG and grounded captions). As SPHINX starts from pretrained encoders and
LLaMA, the demo starts from parts pre-trained on the same world: frozen towers (configs/assets/demo_towers, made by
configs/assets/make_demo_towers.py; their read-outs include the box as the answers print it, per-shape counts, and a
fixed one-hot code of each shape's colour, shape and box tenths) and a decoder pre-trained on text, the world's
scenes described in words (configs/assets/demo_llm, the export of `configs/demo.py:llm`, `llm_config` below); the
fusion starts fresh. 1800 steps: ~7 min on the ninth to sixteenth sessions' 2-core box (412 s wall on jemalloc,
sphinx_jax/host_memory.py), four evaluations of 256 held-out samples included. There (eval world seed 10000): VQA
0.797 (answering from the question alone: 0.41; count 0.97, colour 0.72, shape 0.82, left/right 0.56), REC (IoU >=
0.5) 0.50 (mean IoU 0.40): 0.91 on one-shape scenes, 0.29 / 0.21 with 2 / 3 shapes, where the box fits another shape
than the named one about as often (rec/other_shape 0.28): the decoder reads a shape's box and commits to one, but does
not yet follow the expression.
VQA does not either: colour / shape questions about scenes of several shapes get the asked shape's answer 0.46 of the
time and another shape's 0.54 (vqa/named_shape, vqa/other_shape); its 0.797 comes from the counts and one-shape scenes
(0.99; 2 / 3 shapes 0.75 / 0.60). These numbers move by up to ~0.03 with the float path alone (NOTES.md, fourteenth
session: the same run before the causal attention blocks gave VQA 0.797, REC 0.516; scanned, with YNNPACK, 0.797 /
0.49; on an Intel Xeon, eighteenth session: 460 s, VQA 0.789, REC 0.488); 2400 steps gave VQA 0.785, REC 0.520. The
same demo with a fresh decoder: VQA 0.61-0.71 (the count questions 0.39-0.64, depending on the float path), REC 0.52.

Run: sphinx-jax train --config configs/demo.py --workdir runs/demo
Data: generated on the fly by sphinx_jax/data/shapes.py (no downloads); tokenizer: configs/assets/
demo_tokenizer.model (768 pieces, trained on the same world by configs/assets/make_demo_tokenizer.py).
"""
from pathlib import Path

from sphinx_jax import config as cfg
from sphinx_jax.errors import SphinxError

from configs.sphinx import variant_config

ASSETS = Path(__file__).resolve().parent / "assets"
# Up to 4 questions per image in one conversation: one image forward then trains several answers (the grouping of
# LLaVA-style data), which is what lets the decoder start reading the image within the demo's few hundred steps.
TURNS = 4
MAX_OBJECTS = 3  # shapes per scene in training and evaluation (the world's default is 5)
# A shape's side as a fraction of the image's shorter side (the world's default is 0.14-0.3): at patch 28 a default
# shape covers about 2 tokens, often less than one, which caps how well a box can be read from them.
OBJECT_SIDES = (0.25, 0.45)
# name: (task, ratio, shapes per scene at most). REC on one-shape scenes needs no choice of object, so the decoder
# learns to read a box from the image there first. Grounded captions name every shape with its box. A dataset's
# name seeds its shuffle (pipeline.group_stream), so it is part of the run: on the eighth session's machine the
# count questions were learnt with "gcap" (held-out VQA 0.80, count 0.92) and not with "grounded_caption" (0.64,
# count 0.39); on the ninth session's they were not learnt with "gcap" either (0.68, count 0.58). NOTES.md has the
# trials and this spread.
MIXTURE = {"vqa": ("vqa", 0.35, MAX_OBJECTS), "rec_single": ("rec", 0.15, 1), "rec": ("rec", 0.25, MAX_OBJECTS),
           "reg": ("reg", 0.10, MAX_OBJECTS), "gcap": ("grounded_caption", 0.15, MAX_OBJECTS)}
PATCH = 28
MAX_LEN = 256  # 99 image tokens + 4 turns of text (at most 153 tokens in this world)


def _demo_llm(llm):
  # Unscanned: a scan slices each layer's weights out of the stack and zero-fills stacked activations for the
  # backward every step; without it the demo's step ran 1.07x faster (and the mid-size one of bench/train.py 1.12x).
  llm.update(vocab_size=768, dim=128, n_layers=4, n_heads=4, n_kv_heads=4, max_seq_len=MAX_LEN, multiple_of=64,
             scan_layers=False)


# CPU only: XLA's own dot emitter runs the dim-128 decoder's [2048, 128] x [128, <=384] products and the attention
# faster than YNNPACK's fusions (the demo's step 1.12x; a dim-1024 decoder's 0.94x): train.cpu_library_fusions.
CPU_LIBRARY_FUSIONS = False


def llm_config():
  """The decoder's text-only pre-training (`configs/demo.py:llm`; SPHINX starts from LLaMA, the demo from this):
  conversations about the world's scenes described in words (shapes.describe: every shape with its box, in a
  random order) instead of shown, on world seeds the demo does not train on. configs/assets/demo_llm is its export:
  sphinx-jax train --config configs/demo.py:llm --workdir DIR --config.train.export_to=configs/assets/demo_llm
  (1200 steps of 32 conversations, ~19 min on 2 cores; answer tokens 0.92 right at the end)."""
  tiny = variant_config("tiny_sphinx").model  # the demo's model before its sizes: the same decoder and dtypes
  model = cfg.model_config(tiny.llm, (), 0, 1, dtype=tiny.dtype, param_dtype=tiny.param_dtype, variant="llama",
                           llama_type="llama")
  _demo_llm(model.llm)
  c = cfg.base_config(model)
  c.data = cfg.data_config(
      datasets={name: cfg.dataset_config("synthetic", "", ratio, task=name, seed=100 + seed, domain="flat",
                                         turns=TURNS, max_objects=MAX_OBJECTS, object_sides=OBJECT_SIDES,
                                         as_text=True)
                for seed, (name, ratio) in enumerate({"vqa": 0.45, "rec": 0.35, "reg": 0.2}.items())},
      tokenizer=str(ASSETS / "demo_tokenizer.model"), global_batch_size=32, max_len=MAX_LEN, num_workers=1)
  c.train = cfg.train_config(num_steps=1200, lr=1e-3, min_lr=1e-4, warmup_steps=50, weight_decay=0.0, clip_grad=1.0,
                             log_every=50, checkpoint_every=600, trainable="llm",
                             cpu_library_fusions=CPU_LIBRARY_FUSIONS)
  return c


def get_config(arg: str = ""):
  if arg == "llm":
    return llm_config()
  if arg:
    raise SphinxError(f"configs/demo.py: no preset {arg!r}; use configs/demo.py (the demo) or configs/demo.py:llm "
                      "(its decoder's pre-training).")
  c = variant_config("tiny_sphinx")
  _demo_llm(c.model.llm)
  # Patch 28: 8x8 tokens per tower (99 image tokens, not 291) and 2.4x faster steps; a token then covers a
  # whole shape, which the pre-trained towers describe (configs/assets/make_demo_towers.py).
  c.model.clip.patch = c.model.dinov2.patch = c.model.qformer.vision.patch = PATCH
  c.mesh.update(data=-1, fsdp=1)
  c.data = cfg.data_config(
      datasets={name: cfg.dataset_config("synthetic", "", ratio, task=task, seed=seed, domain="flat", turns=TURNS,
                                         max_objects=objects, object_sides=OBJECT_SIDES)
                for seed, (name, (task, ratio, objects)) in enumerate(MIXTURE.items())},
      tokenizer=str(ASSETS / "demo_tokenizer.model"), global_batch_size=8, max_len=MAX_LEN, num_workers=1,
      bad_fraction_min_records=1000, max_bad_fraction=0.2)
  c.train = cfg.train_config(num_steps=1800, lr=1e-3, min_lr=1e-4, warmup_steps=50, weight_decay=0.0, clip_grad=1.0,
                             log_every=20, eval_every=600, eval_at_start=True, checkpoint_every=600,
                             trainable="stage2", towers_from=str(ASSETS / "demo_towers"),
                             llm_from=str(ASSETS / "demo_llm"), cpu_library_fusions=CPU_LIBRARY_FUSIONS)
  c.eval = cfg.eval_config(tasks=("vqa", "rec"), num_samples=256, world_seed=10_000, max_objects=MAX_OBJECTS,
                           object_sides=OBJECT_SIDES, max_new_tokens=24, batch=16)
  return c
