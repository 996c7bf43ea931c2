"""Weight mixing (sphinx_jax/mixing.py): every leaf against a numpy reference of the formula written here,
subtree restriction, bf16 storage with fp32 arithmetic, zstd inputs and an uncompressed output, refusals that
leave nothing behind, a mixed model that loads and generates, and the memory bound of streaming measured in a
subprocess."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
import pytest
from flax import linen as nn

import sphinx_jax
from configs.sphinx import get_config
from sphinx_jax import checkpoint, cli, mixing
from sphinx_jax.errors import SphinxError
from sphinx_jax.inference.generate import Generator
from sphinx_jax.models.llama import Llama

from checkpoint_helpers import VOCAB, train_tokenizer

SMALL_CHUNK = 4096  # bytes: forces many stored chunks per leaf, so the chunked path is what runs
BF16 = ml_dtypes.bfloat16
REPO = Path(__file__).resolve().parents[1]


def toy_config(width=8):
  return ml_collections.ConfigDict({"model": {"name": "toy", "width": width}})


def toy_params(seed, shapes=None):
  rng = np.random.default_rng(seed)
  shapes = shapes or {"llm/layers/kernel": ((3, 40, 24), np.float32), "llm/embed": ((50, 16), BF16),
                      "llm/norm/scale": ((24,), np.float32), "towers/clip/kernel": ((40, 12), np.float32),
                      "fusion/start_img": ((1, 16), BF16)}
  return {p: rng.standard_normal(shape).astype(dtype) for p, (shape, dtype) in shapes.items()}


def save(path, leaves, config=None, tokenizer=None, chunk_bytes=None, compress=False):
  return checkpoint.save_model_dir(path, checkpoint.unflatten(leaves), config or toy_config(), tokenizer,
                                   chunk_bytes=chunk_bytes, compress=compress)


def load_leaves(path):
  return checkpoint.flatten(checkpoint.load_model_dir(path)[0])


def fp32(x):
  return np.asarray(x, np.float32)


@pytest.fixture(scope="module")
def toys(tmp_path_factory):
  root = tmp_path_factory.mktemp("toys")
  leaves = [toy_params(seed) for seed in range(3)]
  return root, [save(root / f"in{i}", t) for i, t in enumerate(leaves)], leaves


def run_mix(out, inputs, weights, **kwargs):
  recipe = mixing.Recipe(tuple(map(str, inputs)), tuple(weights), kwargs.pop("base", None),
                         tuple(kwargs.pop("include", mixing.DEFAULT_INCLUDE)))
  return mixing.mix(out, recipe, chunk_bytes=SMALL_CHUNK, **kwargs)


def test_weighted_average_matches_numpy_reference(toys, tmp_path):
  _, dirs, leaves = toys
  weights = (0.2, 0.3, 0.5)
  mixed = load_leaves(run_mix(tmp_path / "out", dirs, weights))
  for path, first in leaves[0].items():
    got = mixed[path]
    assert got.dtype == first.dtype and got.shape == first.shape, path
    if path.startswith("llm/"):
      terms = [np.float32(w) * fp32(t[path]) for w, t in zip(weights, leaves)]
      want = ((terms[0] + terms[1]) + terms[2]).astype(first.dtype)
      np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8), err_msg=path)
    else:  # outside the default llm/.* pattern: the first input's bytes
      np.testing.assert_array_equal(got.view(np.uint8), first.view(np.uint8), err_msg=path)


def test_bf16_leaves_use_fp32_arithmetic_and_stay_bf16(tmp_path):
  # 1 + 2^-8 is not a bf16 number: half of (1) and (1 + 2^-7) is exact in fp32 and rounds to 1 (ties to even)
  # only once; summing halves in bf16 would round each term first. With a third of each the two orders differ.
  a, b, c = (np.full((4, 4), v, BF16) for v in (1.0, 1.0078125, 1.015625))
  dirs = [save(tmp_path / f"in{i}", {"llm/w": x}) for i, x in enumerate((a, b, c))]
  w = 1 / 3
  got = load_leaves(run_mix(tmp_path / "out", dirs, (w, w, 1 - 2 * w)))["llm/w"]
  want = (np.float32(w) * fp32(a) + np.float32(w) * fp32(b) + np.float32(1 - 2 * w) * fp32(c)).astype(BF16)
  in_bf16 = (BF16(w) * a + BF16(w) * b + BF16(1 - 2 * w) * c).astype(BF16)
  assert got.dtype == BF16
  np.testing.assert_array_equal(fp32(got), fp32(want))
  assert not np.array_equal(fp32(want), fp32(in_bf16))  # the example does tell the two orders apart


def test_weights_one_zero_reproduce_first_input_bit_exactly(toys, tmp_path):
  _, dirs, leaves = toys
  mixed = load_leaves(run_mix(tmp_path / "out", dirs[:2], (1.0, 0.0), include=[".*"]))
  for path, first in leaves[0].items():
    np.testing.assert_array_equal(mixed[path].view(np.uint8), first.view(np.uint8), err_msg=path)


def test_task_arithmetic_matches_numpy_reference(toys, tmp_path):
  _, dirs, leaves = toys
  base, tasks, lambdas = leaves[0], leaves[1:], (0.7, -0.4)
  with pytest.raises(SphinxError, match="negative weight"):
    run_mix(tmp_path / "refused", dirs[1:], lambdas, base=str(dirs[0]))
  out = run_mix(tmp_path / "out", dirs[1:], lambdas, base=str(dirs[0]), include=["llm/layers/.*"],
                allow_any_weights=True)
  mixed = load_leaves(out)
  for path, original in base.items():
    if path == "llm/layers/kernel":
      b = fp32(original)
      want = (np.float32(lambdas[0]) * (fp32(tasks[0][path]) - b) + np.float32(lambdas[1]) * (fp32(tasks[1][path]) - b)) + b
      np.testing.assert_array_equal(mixed[path], want.astype(original.dtype))
    else:  # not matched by llm/layers/.*: the first input (not the base), bit for bit
      np.testing.assert_array_equal(mixed[path].view(np.uint8), tasks[0][path].view(np.uint8), err_msg=path)
  provenance = checkpoint.read_metadata(out)["provenance"]
  assert provenance["base"] == str(Path(dirs[0]).absolute()) and provenance["weights"] == list(lambdas)
  assert provenance["include"] == ["llm/layers/.*"] and len(provenance["inputs"]) == 2


def compressor(model_dir, leaf):
  return checkpoint.open_leaf(Path(model_dir) / checkpoint.PARAMS_DIR, leaf).spec().to_json()["metadata"]["compressor"]


def test_zstd_inputs_mix_to_the_same_bytes_and_the_output_is_uncompressed(toys, tmp_path):
  # Model directories written before the uncompressed default hold zstd chunks: they must mix alike.
  _, dirs, leaves = toys
  zstd = save(tmp_path / "zstd0", leaves[0], compress=True)
  assert compressor(zstd, "llm/embed") == {"id": "zstd", "level": 1} and compressor(dirs[1], "llm/embed") is None
  weights = (0.25, 0.75)
  want = load_leaves(run_mix(tmp_path / "plain", dirs[:2], weights))
  out = run_mix(tmp_path / "out", [zstd, dirs[1]], weights)
  got = load_leaves(out)
  for path in leaves[0]:
    np.testing.assert_array_equal(got[path].view(np.uint8), want[path].view(np.uint8), err_msg=path)
    assert compressor(out, path) is None, path  # written raw: reading it back costs no decompression


def nothing_written(root: Path, name="out"):
  return not (root / name).exists() and not [p for p in root.iterdir() if p.name.startswith(f".{name}.")]


@pytest.mark.parametrize("change, message", [
    (lambda l: l.pop("llm/norm/scale"), r"llm/norm/scale missing"),
    (lambda l: l.update({"llm/extra": np.zeros(3, np.float32)}), r"llm/extra unexpected"),
    (lambda l: l.update({"llm/embed": np.zeros((50, 17), BF16)}), r"llm/embed bfloat16\[50, 16\] vs bfloat16\[50, 17\]"),
    (lambda l: l.update({"llm/embed": np.zeros((50, 16), np.float32)}), r"llm/embed bfloat16\[50, 16\] vs float32"),
    ("config", r"another model config .*config.model.width differs"),
])
def test_mismatched_checkpoints_are_refused_with_nothing_written(toys, tmp_path, change, message):
  _, dirs, _ = toys
  other = toy_params(5)
  if change == "config":
    save(tmp_path / "other", other, config=toy_config(width=9))
  else:
    change(other)
    save(tmp_path / "other", other)
  with pytest.raises(SphinxError, match=message):
    run_mix(tmp_path / "out", [dirs[0], tmp_path / "other"], (0.5, 0.5))
  assert nothing_written(tmp_path)


def test_different_tokenizers_are_refused(tmp_path):
  leaves = toy_params(0)
  tok_a = train_tokenizer(tmp_path / "a.model")
  tok_b = tmp_path / "b.model"
  tok_b.write_bytes(tok_a.read_bytes() + b"\0")
  save(tmp_path / "a", leaves, tokenizer=tok_a)
  save(tmp_path / "b", leaves, tokenizer=tok_b)
  with pytest.raises(SphinxError, match="different tokenizers"):
    run_mix(tmp_path / "out", [tmp_path / "a", tmp_path / "b"], (0.5, 0.5))
  assert nothing_written(tmp_path)


def test_non_finite_input_or_result_is_refused_naming_the_leaf(toys, tmp_path):
  _, dirs, _ = toys
  bad = toy_params(1)
  bad["llm/layers/kernel"][2, 39, 0] = np.nan
  save(tmp_path / "bad", bad)
  with pytest.raises(SphinxError, match=rf"non-finite values in llm/layers/kernel \[.*\] of {tmp_path / 'bad'}"):
    run_mix(tmp_path / "out", [dirs[0], tmp_path / "bad"], (0.5, 0.5))
  assert nothing_written(tmp_path)
  with pytest.raises(SphinxError, match=r"non-finite values in llm/embed .* of the result; the weights overflow"):
    run_mix(tmp_path / "out", dirs[:2], (3e38, 3e38), allow_any_weights=True)
  assert nothing_written(tmp_path)


@pytest.mark.parametrize("weights, kwargs, message", [
    ((0.5, 0.4), {}, r"sum to 0.9, not 1"),
    ((0.5,), {}, r"2 inputs but 1 weights"),
    ((1.5, -0.5), {}, r"negative weight"),
    ((0.5, 0.5), {"include": ["vision/.*"]}, r"--include 'vision/\.\*' matches no parameter"),
    ((0.5, 0.5), {"include": ["llm/("]}, r"bad --include pattern"),
    ((0.5, 0.5), {"include": ["towers/.*"]}, None),  # allowed; checked to show the refusals are specific
])
def test_weight_and_pattern_checks(toys, tmp_path, weights, kwargs, message):
  _, dirs, _ = toys
  if message is None:
    assert run_mix(tmp_path / "out", dirs[:2], weights, **kwargs).is_dir()
    return
  with pytest.raises(SphinxError, match=message):
    run_mix(tmp_path / "out", dirs[:2], weights, **kwargs)
  assert nothing_written(tmp_path)


# ------------------------------------------------------------------------------ real model, CLI, generate
def text_config():
  config = get_config("tiny_sphinx_tiny")
  config.model.towers = ()
  config.model.llm.vocab_size = VOCAB
  return config


def llm_params(config, seed):
  tokens = jnp.zeros((1, 4), jnp.int32)
  init = jax.jit(lambda t: Llama(config.model.llm).init(jax.random.key(seed), t, positions=t))
  return {"llm": jax.device_get(nn.meta.unbox(init(tokens)["params"]))}


def test_cli_mix_loads_and_generates(tmp_path):
  config, tokenizer = text_config(), train_tokenizer(tmp_path / "tokenizer.model")
  trees = [llm_params(config, seed) for seed in (1, 2)]
  for name, tree in zip("ab", trees):
    checkpoint.save_model_dir(tmp_path / name, tree, config, tokenizer=tokenizer)
  beta = 0.25
  code = cli.main(["mix", "--out", str(tmp_path / "mixed"), "--inputs", str(tmp_path / "a"), str(tmp_path / "b"),
                   "--weights", str(beta), str(1 - beta)])
  assert code == 0
  handle = sphinx_jax.load(tmp_path / "mixed")  # holds the decoder unscanned (handle.py); the directory as saved:
  assert checkpoint.read_config(tmp_path / "mixed") == config and handle.tokenizer.n_words == VOCAB
  a, b = (checkpoint.flatten(t) for t in trees)
  got = checkpoint.flatten(checkpoint.load_model_dir(tmp_path / "mixed")[0])
  for path in a:
    want = (np.float32(beta) * fp32(a[path]) + np.float32(1 - beta) * fp32(b[path])).astype(a[path].dtype)
    np.testing.assert_array_equal(got[path], want, err_msg=path)
  reference = Llama(config.model.llm)
  tokens = np.array([[1, 5, 9, 33]], np.int32)
  want_logits = reference.apply({"params": checkpoint.unflatten(got)["llm"]}, tokens, positions=np.arange(4)[None])[0]
  np.testing.assert_allclose(handle.logits(tokens), want_logits, rtol=1e-6, atol=1e-6)
  from sphinx_jax.models.sphinx import Sphinx
  generator = Generator(Sphinx(config.model), handle.params, handle.tokenizer, buckets=(8, 16))
  ids = generator.generate_ids([[1, 5, 9]], max_new_tokens=4)
  greedy = int(np.argmax(handle.logits(np.array([[1, 5, 9]], np.int32))[0, -1]))
  assert len(ids[0]) >= 1 and ids[0][0] == greedy
  meta = checkpoint.read_metadata(tmp_path / "mixed")["provenance"]
  assert meta["weights"] == [beta, 1 - beta] and meta["include"] == ["llm/.*"] and meta["base"] is None
  # The CLI turns a refusal into one line and exit code 2, writing nothing.
  assert cli.main(["mix", "--out", str(tmp_path / "bad"), "--inputs", str(tmp_path / "a"), str(tmp_path / "b"),
                   "--weights", "0.5", "0.6"]) == 2
  assert nothing_written(tmp_path, "bad")


# ------------------------------------------------------------------------------------------- streaming
RSS_SCRIPT = textwrap.dedent("""
    import json, os, sys, threading, time
    from sphinx_jax import mixing

    def rss():  # resident bytes now (ru_maxrss would include the import's own transient peak)
      return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    peak, done = [0], threading.Event()
    def watch():
      while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)

    # A tiny mix first: the baseline then includes the libraries' one-time set-up (JAX backend, TensorStore
    # and Orbax thread pools), which does not grow with the model.
    mixing.mix(sys.argv[7], mixing.Recipe((sys.argv[5], sys.argv[6]), (0.5, 0.5)))
    recipe = mixing.Recipe((sys.argv[1], sys.argv[2]), (0.5, 0.5), include=(".*",))
    baseline = rss()
    watcher = threading.Thread(target=watch)
    watcher.start()
    mixing.mix(sys.argv[3], recipe, chunk_bytes=int(sys.argv[4]))
    done.set()
    watcher.join()
    print(json.dumps({"baseline": baseline, "peak": peak[0]}))
""")


@pytest.mark.slow
def test_streaming_peak_rss_stays_far_below_one_model(tmp_path):
  # Two ~200 MB checkpoints: one 160 MB leaf (like a scanned layer stack) and four 10 MB ones. The mix is
  # streamed in 4 MB chunks, so its memory should follow the chunk, not the leaf, and not the model (without
  # streaming the big leaf alone needs 3 x 160 MB).
  mb = 1 << 20
  shapes = {"llm/layers/kernel": ((40, 1024, 1024), np.float32)}
  shapes.update({f"llm/other_{i}": ((10, 1024, 256), np.float32) for i in range(4)})
  model_bytes = sum(int(np.prod(s)) * 4 for s, _ in shapes.values())
  chunk = 4 * mb  # inputs stored in chunks of the same bound, as `sphinx-jax mix` would find them by default
  for i in range(2):
    save(tmp_path / f"in{i}", toy_params(i, shapes), chunk_bytes=chunk)
  warm = [save(tmp_path / f"warm{i}", toy_params(i)) for i in range(2)]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  done = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path / "in0"), str(tmp_path / "in1"),
                         str(tmp_path / "out"), str(chunk), *map(str, warm), str(tmp_path / "warm_out")],
                        capture_output=True, text=True, env=env, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  rss = json.loads(done.stdout.strip().splitlines()[-1])
  grown = rss["peak"] - rss["baseline"]
  # Per chunk in flight (checkpoint.LOOKAHEAD being computed, one being stored): the inputs read as float32
  # (the sum is formed in their buffers), the result, TensorStore's read and write buffers, and what the
  # allocator keeps for reuse (measured: 43-75 MB with LOOKAHEAD 2), so 4 x (inputs + 1).
  bound = 4 * (2 + 1) * chunk + 48 * mb
  print(f"mix of 2 x {model_bytes / mb:.0f} MB: peak RSS grew {grown / mb:.0f} MB (bound {bound / mb:.0f} MB)")
  assert grown < bound < model_bytes / 2
  mixed = checkpoint.restore_leaves(tmp_path / "out", ["llm/other_3"])["llm/other_3"]
  a, b = (checkpoint.restore_leaves(tmp_path / f"in{i}", ["llm/other_3"])["llm/other_3"] for i in range(2))
  np.testing.assert_array_equal(mixed, (np.float32(0.5) * a + np.float32(0.5) * b))


# ---------------------------------------------------------------------------------------- the recipe
def test_export_writes_the_params_of_a_training_checkpoint(tmp_path):
  import optax
  from sphinx_jax.train import checkpoints, export, state as state_lib
  params = toy_params(4)
  tree = checkpoint.unflatten(params)
  manager = checkpoints.manager(tmp_path / "run", async_save=False)
  for step, scale in ((2, 1.0), (4, 2.0)):
    state = state_lib.create(jax.tree.map(lambda x: jnp.asarray(x) * scale, tree), optax.adam(1e-3))  # dtype kept
    checkpoints.save(manager, step, state, {}, toy_config())
  manager.wait_until_finished()
  out = export.export(tmp_path / "run", tmp_path / "model", step=2)
  back = load_leaves(out)
  assert set(back) == set(params)  # params only: no optimizer state, step or counters
  for path, want in params.items():
    np.testing.assert_array_equal(back[path].view(np.uint8), want.view(np.uint8), err_msg=path)
  assert checkpoint.read_config(out) == toy_config()
  assert checkpoint.read_metadata(out)["provenance"]["step"] == 2
  with pytest.raises(SphinxError, match=r"no checkpoint of step 3; saved steps: \[2, 4\]"):
    export.export(tmp_path / "run", tmp_path / "other", step=3)


@pytest.mark.heavy  # ~4 min of CPU (four trainer runs); run on demand: pytest -m heavy
def test_recipe_real_then_synthetic_then_mix_then_stage2(tmp_path):
  """configs/recipe_mix.py end to end at tiny size, by its own commands: two 2-step stage-1 runs (flat, then
  textured from the flat model), the mix with β, and a stage-2 run initialised from the mix."""
  # The four commands compile one program; a persistent cache lets the later ones reuse it.
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")

  def sphinx_jax_cli(*args):
    done = subprocess.run([sys.executable, "-m", "sphinx_jax", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

  def stage(name, *overrides):
    sphinx_jax_cli("train", "--config", f"configs/recipe_mix.py:{name},steps=2", "--workdir", tmp_path / name,
                   "--config.data.num_workers=0", *overrides)
    return json.loads((tmp_path / name / "summary.json").read_text())

  real, syn, mixed = tmp_path / "real_model", tmp_path / "syn_model", tmp_path / "mixed"
  stage("real", f"--config.train.export_to={real}")
  stage("synthetic", f"--config.train.init_from={real}", f"--config.train.export_to={syn}")
  beta = 0.3
  sphinx_jax_cli("mix", "--out", mixed, "--inputs", real, syn, "--weights", beta, 1 - beta)
  a, b, m = (load_leaves(p) for p in (real, syn, mixed))
  assert [p for p in a if p.startswith("llm/") and not np.array_equal(a[p], b[p])]  # the second stage moved the LLM
  for path in a:
    want = (np.float32(beta) * fp32(a[path]) + np.float32(1 - beta) * fp32(b[path])).astype(a[path].dtype) \
        if path.startswith("llm/") else a[path]
    np.testing.assert_array_equal(m[path], want, err_msg=path)
  final = stage("stage2", f"--config.train.init_from={mixed}")
  assert final["last_step"] == 2 and np.isfinite(final["loss"])
