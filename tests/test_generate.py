"""Generation: the original's top-p rule, greedy, seeds, stop strings, KV cache, buckets, batching, streaming.

The model is SPHINX-Tiny's tiny twin (ConvNeXt + DINOv2 towers, GQA TinyLlama) fed 224-px views so that it
stays cheap, with random weights; the tokenizer is a real SentencePiece model (byte fallback) trained here on
SPHINX-style dialogue, so "\\n###" has the two tokenisations the original checks.
"""
import io
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
from flax import linen as nn

from configs import sphinx as presets
from sphinx_jax.data.tokenizer import Tokenizer
from sphinx_jax.errors import SphinxError
from sphinx_jax.inference import generate as gen
from sphinx_jax.models.llama import init_cache
from sphinx_jax.models.sphinx import Sphinx

WORDS = "red green blue square circle left right above below the a of and is in on near what where how many".split()
BUCKETS = (16, 32, 64)


def numpy_top_p(probs, p, u):
  """The original `sample_top_p` in numpy with the draw u in [0, 1) made explicit (inverse CDF)."""
  order = np.argsort(-probs, kind="stable")
  sorted_probs = probs[order]
  sorted_probs = np.where(np.cumsum(sorted_probs) - sorted_probs > p, 0.0, sorted_probs)
  sorted_probs = sorted_probs / sorted_probs.sum()
  return order[min(np.searchsorted(np.cumsum(sorted_probs), u, side="right"), len(probs) - 1)]


# ----------------------------------------------------------------------------------------------- sampling
def test_top_p_equals_the_numpy_rule_on_fixed_draws():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(64, 50)).astype(np.float32) * 2
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits) / 0.7, axis=-1))
  for p in (0.1, 0.5, 0.75, 0.95, 1.0):
    u = rng.uniform(size=64).astype(np.float32)
    got = np.asarray(gen.sample_top_p(jnp.asarray(probs), jnp.float32(p), jnp.asarray(u)))
    expected = [numpy_top_p(probs[i].astype(np.float64), p, u[i]) for i in range(64)]
    np.testing.assert_array_equal(got, expected)


def test_top_p_worked_example():
  probs = jnp.array([[0.2, 0.5, 0.3]] * 4)
  u = jnp.array([0.0, 0.6, 0.7, 0.99])  # nucleus p = 0.6 keeps 0.5 and 0.3 -> 0.625, 0.375
  assert gen.sample_top_p(probs, jnp.float32(0.6), u).tolist() == [1, 1, 2, 2]


def test_sampled_frequencies_stay_in_the_nucleus_and_match_it():
  logits = jnp.log(jnp.array([[0.4, 0.25, 0.15, 0.1, 0.06, 0.04]]))
  draws = jax.vmap(lambda k: gen.next_token(logits, jnp.float32(1.0), jnp.float32(0.7), k)[0])(
      jax.random.split(jax.random.key(3), 20000))
  counts = np.bincount(np.asarray(draws), minlength=6)
  assert counts[3:].sum() == 0  # 0.4 + 0.25 + 0.15 = 0.8 covers p = 0.7; 0.1 starts past it
  expected = np.array([0.4, 0.25, 0.15]) / 0.8
  tolerance = 4 * np.sqrt(expected * (1 - expected) / 20000)
  np.testing.assert_array_less(np.abs(counts[:3] / 20000 - expected), tolerance)


def test_temperature_zero_is_argmax():
  logits = jax.random.normal(jax.random.key(0), (8, 40))
  for key in range(3):
    got = gen.next_token(logits, jnp.float32(0.0), jnp.float32(0.1), jax.random.key(key))
    np.testing.assert_array_equal(got, np.argmax(np.asarray(logits), axis=-1))


def test_stop_helpers():
  table = gen.stop_table([[2], [13, 835]])
  assert table.shape == (gen.STOP_ROWS, gen.STOP_WIDTH)
  assert table[:3, -3:].tolist() == [[-1, -1, 2], [-1, 13, 835], [-3, -3, -3]] and (table[:2, :-3] == -1).all()
  lead = [-2] * (gen.STOP_WIDTH - 2)
  window = jnp.array([lead + [-2, 2], lead + [13, 835], lead + [7, 835], lead + [835, 13], [-3] * gen.STOP_WIDTH])
  hit, length = gen.match_stop(window, jnp.asarray(table))
  assert hit.tolist() == [True, True, False, False, False] and length.tolist() == [1, 2, 0, 0, 0]
  with pytest.raises(SphinxError, match="stop strings"):
    gen.stop_table([[5] * (gen.STOP_WIDTH + 1)])
  assert gen.cut_at_stops("yes\n### Human", ["\n###"]) == "yes"
  assert gen.held_back("Yes.\n#", ["\n###"]) == 2 and gen.held_back("Yes.", ["\n###"]) == 0
  assert gen.bucket(17, BUCKETS) == 32 and gen.bucket(64, BUCKETS) == 64 and gen.bucket(65, BUCKETS) == 128


def test_truncation_keeps_the_tail_like_the_original():
  assert gen.truncate_prompt(list(range(10)), max_seq_len=20, image_words=8, max_new_tokens=6) == [4, 5, 6, 7, 8, 9]
  with pytest.raises(SphinxError, match="max_new_tokens"):
    gen.truncate_prompt([1, 2], max_seq_len=20, image_words=8, max_new_tokens=12)


# ----------------------------------------------------------------------------------------------- model
@pytest.fixture(scope="module")
def tokenizer():
  rng = random.Random(0)
  say = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
  dialogue = [f"### Human: {say()}\n### Assistant: {say()}\n###" for _ in range(300)]
  proto = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(dialogue), model_writer=proto, vocab_size=320,
                                 model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                 normalization_rule_name="identity", remove_extra_whitespaces=False,
                                 minloglevel=2)
  return Tokenizer(proto.getvalue())


def random_params(model, image):
  """Random weights without compiling `init`: token embeddings N(0, 1) (as large as the image tokens that leave a
  LayerNorm), matrices N(0, 1/fan_in), norm scales 1 + N(0, 0.2), the rest N(0, 0.2)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 4), jnp.int32), image)["params"]
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    noise = rng.normal(size=leaf.shape).astype(np.float32)
    name = jax.tree_util.keystr(path)
    if "embedding" in name and "llm" in name:
      return jnp.asarray(noise)
    if leaf.ndim >= 2:
      stacked = "layers" in name or "blocks" in name  # scanned params carry a leading [depth] axis
      return jnp.asarray(noise / np.sqrt(np.prod(leaf.shape[1 if stacked else 0:-1])))
    return jnp.asarray(1.0 + 0.2 * noise if "scale" in name or "weight" in name else 0.2 * noise)

  return jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(shapes))


@pytest.fixture(scope="module")
def setup(tokenizer):
  """(Generator, model, params, image float[224, 224, 3]) with random weights."""
  model_config = presets.get_config("tiny_sphinx_tiny").model
  model_config.update(image_size=224)
  model_config.convnext.input_size = 256  # 224 views, like SPHINX's ConvNeXt path: cheap on CPU
  model_config.llm.vocab_size = tokenizer.n_words
  model = Sphinx(model_config)
  image = jax.random.normal(jax.random.key(1), (1, 224, 224, 3))
  params = random_params(model, image)
  return gen.Generator(model, params, tokenizer, buckets=BUCKETS), model, params, image[0]


@pytest.fixture(scope="module")
def forward(setup):
  """The uncached forward, jitted once for the module (logits aligned with tokens)."""
  _, model, params, _ = setup
  apply = jax.jit(lambda params, tokens, images: model.apply({"params": params}, tokens, images))
  return lambda tokens, images=None: apply(params, tokens, images)


def prompt_ids(tokenizer, text):
  return tokenizer.encode(text, bos=True, eos=False)


PROMPT = "### Human: what is left of the circle"


def test_cached_generation_equals_uncached_recomputation(setup, forward, tokenizer):
  generator, _, _, image = setup
  prompt = prompt_ids(tokenizer, PROMPT)
  new = generator.generate_ids([prompt], image[None], max_new_tokens=12)[0]
  assert len(new) == 12
  logits = forward(jnp.asarray([prompt + new]), image[None])
  np.testing.assert_array_equal(np.argmax(logits[0, len(prompt) - 1:-1], -1), new)


def test_cached_logits_equal_full_forward_logits(setup, forward, tokenizer):
  generator, model, params, image = setup
  prompt = prompt_ids(tokenizer, PROMPT)
  new = generator.generate_ids([prompt], image[None], max_new_tokens=12, temperature=1.0, top_p=1.0, seed=1)[0]
  assert len(set(new)) > 4  # sampled, so the steps see varied tokens
  full = forward(jnp.asarray([prompt + new]), image[None])
  prefill = jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=Sphinx.prefill))
  decode = jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=Sphinx.decode))
  padded = jnp.asarray([prompt + [0] * (16 - len(prompt))])
  cache = init_cache(model.config.llm, 1, model.image_words + 32)
  logits, cache, position = prefill(params, padded, jnp.array([len(prompt)]), cache, image[None])
  cached = [logits[0]]
  for token in new[:-1]:
    logits, cache = decode(params, jnp.array([[token]]), position[:, None], cache)
    position = position + 1
    cached.append(logits[0])
  np.testing.assert_allclose(np.stack(cached), full[0, len(prompt) - 1:-1], rtol=0, atol=1e-5)


def test_no_retrace_within_a_bucket(setup, tokenizer):
  generator, _, _, image = setup
  short, longer = prompt_ids(tokenizer, "red"), prompt_ids(tokenizer, "what is near the")
  assert len(short) < len(longer) and gen.bucket(len(short), BUCKETS) == gen.bucket(len(longer), BUCKETS)
  generator.generate_ids([short], image[None], max_new_tokens=5)
  traced = generator.traces
  generator.generate_ids([longer], image[None], max_new_tokens=9, temperature=0.8, top_p=0.6, seed=4)
  assert generator.traces == traced  # other length, budget, temperature, top_p, seed: same program
  generator.generate_ids([prompt_ids(tokenizer, "red")], None, max_new_tokens=5)
  text_only = generator.traces  # (a text-only batch is its own program)
  generator.generate_ids([prompt_ids(tokenizer, "what is near")], None, max_new_tokens=3)
  assert generator.traces == text_only
  generator.generate_ids([prompt_ids(tokenizer, " ".join(WORDS))], None, max_new_tokens=5)
  assert generator.traces == text_only + 1  # a longer prompt moves to the next bucket


def test_seeds_are_deterministic(setup, tokenizer):
  generator, _, _, image = setup
  run = lambda seed: generator.generate_ids([prompt_ids(tokenizer, "where is the")], image[None],
                                            max_new_tokens=16, temperature=1.0, top_p=0.9, seed=seed)[0]
  assert run(7) == run(7)
  assert run(7) != run(8)


def first_stop(ids, sequences):
  """Index where the first of `sequences` to complete starts in ids (len(ids) if none), scanning left to right."""
  for end in range(1, len(ids) + 1):
    for seq in sequences:
      if ids[max(0, end - len(seq)):end] == seq:
        return end - len(seq)
  return len(ids)


def test_eos_ends_a_row_and_is_dropped(setup, tokenizer):
  """EOS's lm_head column becomes a copy of a generated token's column, so greedy decoding picks EOS (argmax takes
  the lower id of a tie) exactly where that token first came: the row ends there, without the EOS."""
  generator, model, params, _ = setup
  prompt = [prompt_ids(tokenizer, "### Human: where is the")]
  free = generator.generate_ids(prompt, None, max_new_tokens=12, stops=[])[0]
  assert len(free) == 12  # no EOS of its own
  k = next(i for i in range(1, 12) if free[i] not in free[:i] and free[i] > tokenizer.eos_id)
  kernel = params["llm"]["lm_head"]["kernel"]
  llm = dict(params["llm"], lm_head={"kernel": kernel.at[:, tokenizer.eos_id].set(kernel[:, free[k]])})
  ended = gen.Generator(model, dict(params, llm=llm), tokenizer, buckets=BUCKETS)
  assert ended.generate_ids(prompt, None, max_new_tokens=12, stops=[])[0] == free[:k]


def test_stop_strings_cut_exactly(setup, tokenizer):
  generator, _, _, image = setup
  prompt = [prompt_ids(tokenizer, "### Human: how many")]
  sampling = dict(max_new_tokens=16, temperature=1.0, top_p=1.0, seed=3)  # a random model's greedy text repeats
  free = generator.generate_ids(prompt, image[None], **sampling)[0]
  text = tokenizer.decode(free)
  # a stop string whose ids (one of its two tokenisations) are one generated token: the loop stops on them
  word = next(t for t in free[2:] if [t] in gen.stop_sequences(tokenizer, [tokenizer.decode([t])]))
  stop = tokenizer.decode([word])
  k = first_stop(free, gen.stop_sequences(tokenizer, [stop]))
  assert 0 < k < 16
  assert generator.generate_ids(prompt, image[None], stops=[stop], **sampling)[0] == free[:k]
  assert generator.generate(prompt, image[None], stops=[stop], **sampling)[0] == \
      gen.cut_at_stops(tokenizer.decode(free[:k]), [stop])
  # a stop string that starts inside a token: cut in the text
  stop = text[len(text) // 2:len(text) // 2 + 3]
  assert generator.generate(prompt, image[None], stops=[stop], **sampling)[0] == text[:text.find(stop)]


def test_sphinx_stop_has_both_tokenisations(tokenizer):
  sequences = gen.stop_sequences(tokenizer, gen.SPHINX_STOPS)
  assert sequences[0] == [tokenizer.eos_id] and len(sequences) == 3
  assert all(tokenizer.decode(s) == "\n###" for s in sequences[1:])
  assert sequences[1] != sequences[2]


def test_batch_with_mixed_rows_equals_single_calls(setup, tokenizer):
  generator, _, _, image = setup
  prompts = [prompt_ids(tokenizer, "### Human: what is on the left"), prompt_ids(tokenizer, "blue")]
  other = jax.random.normal(jax.random.key(5), image.shape)
  batch = generator.generate_ids(prompts, jnp.stack([image, other]), has_image=[True, False], max_new_tokens=10)
  assert batch[0] == generator.generate_ids(prompts[:1], image[None], max_new_tokens=10)[0]
  assert batch[1] == generator.generate_ids(prompts[1:], None, max_new_tokens=10)[0]


def test_stream_joins_to_generate(setup, tokenizer):
  generator, _, _, _ = setup
  prompt = "### Human: red circle"
  sampling = dict(max_new_tokens=14, temperature=0.9, top_p=0.8, seed=2)
  full = generator.generate([prompt], None, stops=[], **sampling)[0]
  deltas = list(generator.stream(prompt, None, stops=[], **sampling))
  assert "".join(deltas) == full and len(deltas) > 1
  stop = full[4:6]
  deltas = list(generator.stream(prompt, None, stops=[stop], **sampling))
  assert "".join(deltas) == generator.generate([prompt], None, stops=[stop], **sampling)[0] == full[:full.find(stop)]


def test_long_prompts_are_left_truncated(setup, tokenizer):
  generator, _, _, _ = setup
  short = gen.Generator(generator.model, generator.params, tokenizer, buckets=BUCKETS, max_seq_len=24)
  prompt = prompt_ids(tokenizer, " ".join(WORDS))
  assert len(prompt) > 16
  got = short.generate_ids([prompt], None, max_new_tokens=8)[0]
  assert got == generator.generate_ids([prompt[-16:]], None, max_new_tokens=8)[0]
