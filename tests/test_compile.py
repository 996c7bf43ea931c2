"""`sphinx-jax compile`: TPU topologies from their names, ahead-of-time compiles on this CPU host checked against
sizes counted by hand, the not-fitting report, and the analytic FLOP count against a hand count.

Needs libtpu (requirements-torch.txt), which describes TPU slices without a TPU.
"""
import math
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util

from configs.sphinx import get_config
from sphinx_jax import cli
from sphinx_jax import compile as aot
from sphinx_jax import topology as topo
from sphinx_jax.errors import SphinxError
from sphinx_jax.models.sphinx import Sphinx
from sphinx_jax.train import flops
from sphinx_jax.train.loop import init_inputs

pytest.importorskip("libtpu")

GIB = 2 ** 30
REPO = Path(__file__).resolve().parents[1]


def tiny_config(rows=8, max_len=291 + 128):  # 291 image positions + 128 text tokens
  c = get_config("tiny_sphinx")
  c.data.global_batch_size = rows
  c.data.max_len = max_len
  return c


def param_sizes(model_config):
  """{'/'-joined path: element count} of the model's parameters (abstract init, nothing materialised)."""
  model = Sphinx(model_config)
  # init under eval_shape, not lazy_init: a MoE layer sows its balancing loss, a value lazy_init refuses.
  boxed = jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a), *init_inputs(model_config))["params"]
  flat = traverse_util.flatten_dict(boxed, sep="/")
  return {path: math.prod(leaf.value.shape if hasattr(leaf, "value") else leaf.shape) for path, leaf in flat.items()}


# ------------------------------------------------------------------------------------------------ topologies
@pytest.mark.parametrize("name, chips, grid, kind", [
    ("v5p-128", 64, (4, 4, 4), "TPU v5"),
    ("v5p-8", 4, (2, 2, 1), "TPU v5"),
    ("v4-8", 4, (2, 2, 1), "TPU v4"),
    ("v4-32", 16, (2, 2, 4), "TPU v4"),
    ("v5e-4", 4, (2, 2), "TPU v5 lite"),
    ("v5e-256", 256, (16, 16), "TPU v5 lite"),
    ("v6e-64", 64, (8, 8), "TPU v6 lite"),
])
def test_topology_from_name(name, chips, grid, kind):
  t = topo.describe(name)
  assert (t.chips, t.grid) == (chips, grid)
  assert {d.device_kind for d in t.devices} == {kind}
  assert len({d.id for d in t.devices}) == chips


def test_two_slices_put_data_across_slices():
  t = topo.describe("v5e-16", num_slices=2)
  assert t.chips == 32
  c = tiny_config()
  c.mesh.update(data=1, fsdp=-1, tensor=2)
  mesh = topo.topology_mesh(c.mesh, t)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 8, "tensor": 2, "expert": 1}
  slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  assert (slices[0] == 0).all() and (slices[1] == 1).all()


@pytest.mark.parametrize("name", ["v5p-6", "v5p-12", "v5e-512", "v3-8", "v5p128", "v4-4"])
def test_bad_topology_names(name):
  with pytest.raises(SphinxError, match="--topology"):
    topo.describe(name)


def test_batch_must_split_over_the_mesh():
  with pytest.raises(SphinxError, match="global_batch_size=6"):
    aot.run(tiny_config(rows=6), "v5e-4", steps=("train",))


def test_parse_oom_messages():
  whole = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
           "Used 36.53G of 15.75G hbm. Exceeded hbm capacity by 20.78G.")
  temporaries = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
                 "(72.52G) exceeds available HBM (15.75G).")
  assert aot.parse_oom(whole) == (int(36.53 * GIB), int(15.75 * GIB))
  assert aot.parse_oom(temporaries) == (int(72.52 * GIB), int(15.75 * GIB))
  assert aot.parse_oom("RESOURCE_EXHAUSTED: something else") is None


# -------------------------------------------------------------------------------------------- tiny compiles
@pytest.mark.parametrize("name, steps", [
    pytest.param("v5e-4", ("train", "decode"), marks=pytest.mark.slow),
    pytest.param("v5p-8", ("train",), marks=pytest.mark.slow),  # a second ~1.5 min CPU compile; CI runs it
])
def test_tiny_compile_memory_within_hand_bounds(name, steps):
  c = tiny_config()
  report = aot.run(c, name, steps=steps)
  chips = 4
  sizes = param_sizes(c.model)
  frozen = sum(n for p, n in sizes.items() if p.startswith("towers/"))
  trainable = sum(sizes.values()) - frozen
  # fp32 everywhere in the tiny twin: params + Adam mu and nu for the trainable ones, frozen towers no state.
  state = 4 * (frozen + 3 * trainable)
  batch = 8 * (128 * 4 + 128 + 224 * 224 * 3 + 1)  # tokens int32, loss_mask, uint8 images, has_image
  train = report.steps[0]
  assert train.name == "train" and train.fits
  assert state / chips <= train.arguments <= 1.25 * state / chips + batch
  assert 0.9 * state / chips <= train.aliased <= train.outputs  # the donated state is updated in place
  assert 0 < train.temporaries < 1 * GIB
  assert train.peak < topo.GENERATIONS[name.split("-")[0]].hbm_bytes
  if "decode" in steps:
    decode = report.steps[1]
    cache_len = 291 + 128  # max_len: image positions + text
    cache = 2 * 8 * cache_len * 64 * 4 * 2 + 2 * 8 * cache_len * 4  # k, v [L, B, K, S, H] fp32; positions, segments
    decoder = 4 * sum(n for p, n in sizes.items() if p.startswith("llm/"))  # jit drops the unused tower weights
    assert decode.fits
    assert (decoder + cache) / chips <= decode.arguments <= 1.25 * (decoder + cache) / chips + 1024
    assert decode.aliased >= 0.9 * cache / chips  # the cache is donated
  assert report.fits


@pytest.mark.slow  # ~2.5 min of CPU: the tiny MoE twin with its experts split over the expert axis
def test_tiny_moe_compile_over_expert_and_fsdp_axes():
  c = tiny_config()
  c.model = get_config("tiny_sphinx_moe").model
  c.mesh.update(data=1, fsdp=2, tensor=1, expert=2)
  sizes = param_sizes(c.model)  # with the default 'auto' dispatch ('blocked' here): expert_parallel needs the mesh
  c.model.llm.moe.dispatch = "expert_parallel"  # shard_map + all_to_all lowered for TPU
  report = aot.run(c, "v5p-8", steps=("train",))
  train = report.steps[0]
  assert report.mesh == {"data": 1, "fsdp": 2, "tensor": 1, "expert": 2} and train.fits
  frozen = sum(n for p, n in sizes.items() if p.startswith("towers/"))
  experts = sum(n for p, n in sizes.items() if p.split("/")[-1] in ("gate", "up", "down") and "/moe/" in p)
  # fp32 params, Adam mu and nu for the trainable ones; expert weights split 4 ways (expert x fsdp), the rest
  # at most 2 (fsdp; replicated over expert).
  state = lambda n, trainable=True: 4 * n * (3 if trainable else 1)  # noqa: E731
  rest = sum(sizes.values()) - frozen - experts
  side = c.model.image_size
  batch = 8 * (128 * 4 + 128 + side * side * 3 + 1)
  assert (state(experts) + state(rest) + state(frozen, False)) / 4 <= train.arguments
  assert train.arguments <= 1.25 * (state(experts) / 4 + (state(rest) + state(frozen, False)) / 2) + batch
  assert 0 < train.temporaries < 1 * GIB


def test_not_fitting_is_reported_with_the_compilers_numbers(capsys):
  # 16 rows of 16k positions through the tiny decoder without remat on v5e-4 (16 GiB per chip): the attention
  # logits alone are 4 rows x 4 heads x 16k^2 x 4 bytes = 16 GiB per chip.
  code = cli.main(["compile", "--config", f"{REPO}/configs/sphinx.py:tiny_sphinx", "--topology", "v5e-4",
                   "--steps", "train", "--config.data.global_batch_size=16", "--config.data.max_len=16384",
                   "--config.model.llm.max_seq_len=20000"])
  out = capsys.readouterr().out
  assert code == aot.NOT_FITTING
  row = next(line for line in out.splitlines() if line.startswith("train"))
  name, fits, seconds, needed, hbm, compiler = row.split()[:6]
  assert (fits, compiler) == ("NO", "compiler:") and "RESOURCE_EXHAUSTED" in row
  assert float(needed) > 16.0 and 15.0 < float(hbm) <= 16.0  # the compiler's numbers, in GiB
  assert "DOES NOT FIT" in out


# --------------------------------------------------------------------------------------------------- FLOPs
def test_flops_equal_a_hand_count_for_tiny_sphinx():
  m = tiny_config().model
  rows, seq = 2, 400  # 109 text tokens + 291 image positions
  # Decoder (D 64, 2 layers, 4 heads of 16, 4 KV heads, FFN int(2*256/3)=170 -> 192, vocab 32000).
  per_layer = 2 * 64 * 64 + 2 * 64 * 64 + 3 * 64 * 192
  matmul_weights = 2 * per_layer + 64 * 32000
  sizes = param_sizes(m)
  norms = sum(n for p, n in sizes.items() if p.startswith("llm/") and "norm" in p)
  llm = sum(n for p, n in sizes.items() if p.startswith("llm/"))
  assert matmul_weights == llm - sizes["llm/embed/embedding"] - norms
  decoder = 6 * matmul_weights * rows * seq + 6 * 2 * 64 * seq * seq * rows
  # Towers on one 224 view: 256 patches of 14x14x3, 257 tokens.
  clip = 2 * 256 * 588 * 64 + 2 * (2 * 257 * (4 * 64 ** 2 + 2 * 257 * 64 + 2 * 64 * 256))
  dino = 2 * 256 * 588 * 32 + 2 * (2 * 257 * (4 * 32 ** 2 + 2 * 257 * 32 + 3 * 32 * 64))
  eva = 2 * 256 * 588 * 48 + 2 * (2 * 257 * (4 * 48 ** 2 + 2 * 257 * 48 + 2 * 48 * 96))
  # ConvNeXt at 256: stem to 64x64x16, stages at 64, 32, 16, 8 px with (1, 1, 2, 1) blocks of (16, 32, 64, 128).
  block = lambda h, c: 2 * h * h * (49 * c + 8 * c * c)  # noqa: E731
  down = lambda h, cin, cout: 2 * h * h * 4 * cin * cout  # noqa: E731
  convnext = (2 * 64 * 64 * 48 * 16 + block(64, 16) + down(32, 16, 32) + block(32, 32) + down(16, 32, 64)
              + 2 * block(16, 64) + down(8, 64, 128) + block(8, 128))
  # Q-Former: 2 layers of width 64 (FFN 128) on 32 queries; layer 0 cross-attends to 257 EVA tokens of 48.
  qformer = (2 * 2 * 32 * (4 * 64 ** 2 + 2 * 32 * 64 + 2 * 64 * 128)
             + 2 * (2 * 32 * 64 ** 2 + 2 * 257 * 48 * 64 + 2 * 32 * 257 * 64))
  # Fusion: visual_proj [64 + 128 + 32 = 224 -> 64] on 257 tokens, qformer_proj [64 -> 64] on 32; forward and
  # weight gradient (the towers' outputs are under stop_gradient).
  assert sizes["fusion/visual_proj/dense/kernel"] == 224 * 64
  fusion = 2 * (2 * 257 * 224 * 64 + 2 * 32 * 64 * 64)
  hand = decoder + rows * (clip + dino + eva + convnext + qformer + fusion)
  assert flops.step_flops(m, rows, seq) == pytest.approx(hand, rel=0.01)


# --------------------------------------------------------------------------------------------------- full size
@pytest.mark.parametrize("topology, hbm_gib, weight_shards", [
    pytest.param("v5p-128", 95, 64, marks=pytest.mark.slow),  # ~8 min of CPU, 4.4 GB: CI's second stage
    pytest.param("v5e-256", 16, 256, marks=pytest.mark.heavy),  # the same again: on demand, pytest -m heavy
])
def test_sphinx_1k_stage2_fits(topology, hbm_gib, weight_shards):
  from configs.topologies import get_config as preset
  c = preset(f"sphinx_1k@{topology}")
  report = aot.run(c, topology, steps=("train",))
  train = report.steps[0]
  # 13B decoder + fusion trainable in fp32 with Adam (12 bytes each) and ~3.4B bf16 tower weights, split over
  # every chip (fsdp x tensor).
  assert train.fits and report.fits
  assert train.arguments >= (12 * 13.0e9 + 2 * 3.0e9) / weight_shards
  assert train.peak < hbm_gib * GIB


@pytest.mark.heavy  # ~10 min of CPU per full-size compile; run on demand: pytest -m heavy
@pytest.mark.parametrize("variant", ["sphinx_moe", "sphinx_moe_1k"])  # 1 view (291 image positions) and 5 (1455)
def test_sphinx_moe_stage2_fits_on_v5p_128_with_expert_parallelism(variant):
  from configs.topologies import get_config as preset
  c = preset(f"{variant}@v5p-128")
  assert c.model.llm.moe.dispatch == "expert_parallel"
  report = aot.run(c, "v5p-128", steps=("train",))
  train = report.steps[0]
  assert report.mesh == {"data": 1, "fsdp": 8, "tensor": 1, "expert": 8}
  # Mixtral-8x7B (46.7B, 45.1B of them experts) trainable in fp32 with Adam (12 bytes each) and ~3.4B tower
  # weights, over 64 chips: the experts split 64 ways (expert x fsdp), the rest 8 ways (fsdp).
  assert train.fits and report.fits
  assert train.arguments >= (12 * 46.7e9 + 2 * 3.0e9) / 64
  assert train.peak < 95 * GIB
