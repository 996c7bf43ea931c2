"""The demo: a tiny SPHINX (all four towers, 1 view at 224 px, a 4-layer decoder) trained on the synthetic
world's task mixture, sized so that on a 2-core CPU it finishes in about 10 minutes and held-out VQA and REC
accuracy rise far above their first evaluation.

Run: sphinx-jax train --config configs/demo.py --workdir runs/demo
Data: generated on the fly by sphinx_jax/data/shapes.py (no downloads); tokenizer: configs/assets/
demo_tokenizer.model (768 pieces, trained on the same world by configs/assets/make_demo_tokenizer.py).
"""
from pathlib import Path

from sphinx_jax import config as cfg

from configs.sphinx import variant_config

ASSETS = Path(__file__).resolve().parent / "assets"
MIXTURE = {"vqa": 0.5, "rec": 0.35, "reg": 0.15}


def get_config(arg: str = ""):
  c = variant_config("tiny_sphinx")
  c.model.llm.update(vocab_size=768, dim=128, n_layers=4, n_heads=4, n_kv_heads=4, max_seq_len=512,
                     multiple_of=64, scan_layers=True)
  c.mesh.update(data=-1, fsdp=1)
  c.data = cfg.data_config(
      datasets={task: cfg.dataset_config("synthetic", "", ratio, task=task, seed=0, domain="flat")
                for task, ratio in MIXTURE.items()},
      tokenizer=str(ASSETS / "demo_tokenizer.model"), global_batch_size=8, max_len=291 + 96, num_workers=1,
      bad_fraction_min_records=1000, max_bad_fraction=0.2)
  c.train = cfg.train_config(num_steps=1200, lr=1e-3, min_lr=1e-4, warmup_steps=50, weight_decay=0.0, clip_grad=1.0,
                             log_every=20, eval_every=400, eval_at_start=True, checkpoint_every=400,
                             trainable="stage2")
  c.eval = cfg.eval_config(tasks=("vqa", "rec"), num_samples=48, world_seed=10_000, max_new_tokens=24, batch=16)
  return c
