"""Text-only LLaMA presets: the decoder alone, trained on plain-text corpora (the original's text pre-training,
`accessory/main_pretrain.py`, and SPHINX stage 1's joint text loss), and the model of `convert --from hf`.

Run: sphinx-jax train --config configs/llama.py:tiny --workdir DIR --config.data.datasets.corpus.path=FILE
     --config.data.tokenizer=tokenizer.model --config.model.llm.vocab_size=N
Presets: llama2_13b, tinyllama, tiny (CPU).
"""
from configs.sphinx import LLMS, TINY_LLMS
from sphinx_jax import config as cfg


def get_config(arg: str = "tiny"):
  tiny = arg == "tiny"
  llm = TINY_LLMS["llama2_13b"]() if tiny else LLMS[arg]()
  model = cfg.model_config(llm, (), 0, 1, variant="llama", llama_type="llama")
  if tiny:
    model.dtype = "float32"
    llm.update(max_seq_len=256, scan_layers=True)
  c = cfg.base_config(model)
  c.data = cfg.data_config(datasets={"corpus": cfg.dataset_config("text", "", 1.0)}, global_batch_size=8,
                           max_len=llm.max_seq_len if tiny else 4096, num_workers=0)
  c.train = cfg.train_config(lr=3e-3 if tiny else 1e-4, min_lr=1e-4 if tiny else 1e-5, warmup_steps=2,
                             num_steps=20, log_every=1, checkpoint_every=5, trainable="llm")
  return c
