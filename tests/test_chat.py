"""`handle.chat` / `.generate` and `sphinx-jax generate` on a tiny random SPHINX-Tiny model directory: the CLI's
streamed reply equals the handle's greedy reply, which equals greedy decoding by hand with the handle's logits."""
import io
from contextlib import redirect_stdout

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from PIL import Image

import sphinx_jax
from configs.demo import ASSETS
from configs.sphinx import variant_config
from sphinx_jax import checkpoint, cli
from sphinx_jax.data import conversation
from sphinx_jax.data.tokenizer import Tokenizer
from sphinx_jax.models.sphinx import Sphinx
from sphinx_jax.train.loop import init_inputs

TOKENIZER = ASSETS / "demo_tokenizer.model"

pytestmark = pytest.mark.slow  # real subprocesses / whole-model compiles: the second CI stage


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  config = variant_config("tiny_sphinx_tiny")
  config.model.llm.update(vocab_size=Tokenizer.from_file(TOKENIZER).n_words, max_seq_len=512)
  model = Sphinx(config.model)
  params = jax.jit(lambda: nn.meta.unbox(model.lazy_init(jax.random.key(0), *init_inputs(config.model))["params"]))()
  return checkpoint.save_model_dir(tmp_path_factory.mktemp("ckpt") / "tiny", params, config, TOKENIZER)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
  path = tmp_path_factory.mktemp("img") / "wide.png"
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)).save(path)
  return path


def test_chat_cli_and_handle_agree_with_greedy_by_hand(model_dir, photo):
  handle = sphinx_jax.load(model_dir)
  question = "What colour is the circle?"
  reply = handle.chat(photo, question, temperature=0.0, max_new_tokens=6)

  tok = handle.tokenizer
  ids = tok.encode(conversation.render_prompt([], question), bos=True, eos=False)
  pixels = handle.pixels(photo)[None]
  generated = []
  for _ in range(6):  # uncached greedy with the scoring path
    nxt = int(np.argmax(handle.logits(np.asarray([ids + generated]), pixels)[0, -1]))
    if nxt == tok.eos_id:
      break
    generated.append(nxt)
  assert reply == conversation.cut_reply(tok.decode(generated)) or reply == tok.decode(generated).split("\n###")[0]

  out = io.StringIO()
  with redirect_stdout(out):
    code = cli.main(["generate", "--ckpt", str(model_dir), "--image", str(photo), "--prompt", question,
                     "--temperature", "0", "--max-new-tokens", "6"])
  assert code == 0 and out.getvalue() == reply + "\n"


def test_generate_batch_mixes_image_and_text_rows(model_dir, photo):
  handle = sphinx_jax.load(model_dir)
  prompts = [conversation.render_prompt([], "Describe it."), conversation.render_prompt([], "Hello?")]
  both = handle.generate([photo, None], prompts, temperature=0.0, max_new_tokens=5)
  assert both[0] == handle.generate([photo], prompts[:1], temperature=0.0, max_new_tokens=5)[0]
  assert both[1] == handle.generate(None, prompts[1:], temperature=0.0, max_new_tokens=5)[0]


def test_text_only_checkpoint_refuses_images(tmp_path, photo):
  config = variant_config("tiny_sphinx_tiny")
  config.model.towers = ()
  config.model.llm.vocab_size = Tokenizer.from_file(TOKENIZER).n_words
  model = Sphinx(config.model)
  params = jax.jit(lambda: nn.meta.unbox(model.lazy_init(jax.random.key(0),
                                                        jax.ShapeDtypeStruct((1, 2), jnp.int32))["params"]))()
  handle = sphinx_jax.load(checkpoint.save_model_dir(tmp_path / "text", params, config, TOKENIZER))
  with pytest.raises(sphinx_jax.SphinxError, match="no vision towers"):
    handle.chat(photo, "What is this?")
