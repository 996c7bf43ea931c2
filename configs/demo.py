"""The demo: a tiny SPHINX (all four towers, 1 view at 224 px, a 4-layer decoder) trained on the synthetic
world's task mixture (scenes of 1-3 shapes, up to 4 questions per image). Sized for ~10 min on a 2-core CPU
(600 steps: 650 s measured); held-out VQA accuracy goes from 0 to ~0.4-0.5, against ~0.4 for answering from the
question alone (vqa/prior_baseline); REC (IoU >= 0.5) stays near 0: the random frozen towers barely see shapes
(NOTES.md).

Run: sphinx-jax train --config configs/demo.py --workdir runs/demo
Data: generated on the fly by sphinx_jax/data/shapes.py (no downloads); tokenizer: configs/assets/
demo_tokenizer.model (768 pieces, trained on the same world by configs/assets/make_demo_tokenizer.py).
"""
from pathlib import Path

from sphinx_jax import config as cfg

from configs.sphinx import variant_config

ASSETS = Path(__file__).resolve().parent / "assets"
MIXTURE = {"vqa": 0.5, "rec": 0.35, "reg": 0.15}
# Up to 4 questions per image in one conversation: one image forward then trains several answers (the grouping of
# LLaVA-style data), which is what lets the decoder start reading the image within the demo's few hundred steps.
TURNS = 4
MAX_OBJECTS = 3  # shapes per scene in training and evaluation (the world's default is 5)


def get_config(arg: str = ""):
  c = variant_config("tiny_sphinx")
  c.model.llm.update(vocab_size=768, dim=128, n_layers=4, n_heads=4, n_kv_heads=4, max_seq_len=512,
                     multiple_of=64, scan_layers=True)
  c.mesh.update(data=-1, fsdp=1)
  c.data = cfg.data_config(
      datasets={task: cfg.dataset_config("synthetic", "", ratio, task=task, seed=0, domain="flat", turns=TURNS,
                                         max_objects=MAX_OBJECTS)
                for task, ratio in MIXTURE.items()},
      tokenizer=str(ASSETS / "demo_tokenizer.model"), global_batch_size=8, max_len=512, num_workers=1,
      bad_fraction_min_records=1000, max_bad_fraction=0.2)
  c.train = cfg.train_config(num_steps=600, lr=1e-3, min_lr=1e-4, warmup_steps=50, weight_decay=0.0, clip_grad=1.0,
                             log_every=20, eval_every=300, eval_at_start=True, checkpoint_every=300,
                             trainable="stage2")
  c.eval = cfg.eval_config(tasks=("vqa", "rec"), num_samples=48, world_seed=10_000, max_objects=MAX_OBJECTS,
                           max_new_tokens=24, batch=16)
  return c
