"""LLaMA2-Accessory checkpoints in and out: shard merge/split by the fairscale rules, bit-exact round trips at
mp 1/2/8, the four-file layout, and bad input (truncated, corrupt, missing shard, disagreeing replicas,
unknown llama_type, config.json or tower geometry that does not match the tensors, a pickle that would run
code, a tree that does not match its config) through the API and the CLI.

Source checkpoints are built here from torch random tensors with the original's key names and shapes
(test_accessory_keys.golden) and split by the rules as written in this file, independently of the converter.
"""
import json
import os
import re

import numpy as np
import pytest
import torch

from sphinx_jax import checkpoint
from sphinx_jax.cli import main as cli_main
from sphinx_jax.convert import accessory
from sphinx_jax.errors import SphinxError
from test_accessory_keys import VARIANTS, golden, tokenizer_model  # noqa: F401 (a fixture)

# ---------------------------------------------------------------------------------- source checkpoints
COLUMN = re.compile(r"^(layers\.\d+\.(attention\.w[qkv]|feed_forward\.w[13])\.weight|output\.weight)$")
ROW = re.compile(r"^(layers\.\d+\.(attention\.wo|feed_forward\.w2)\.weight|tok_embeddings\.weight)$")
MOE = re.compile(r"^layers\.\d+\.feed_forward\.w[123]$")

LLAMA_ARGS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=None, vocab_size=32000, multiple_of=32,
                  ffn_dim_multiplier=None, norm_eps=1e-05, rope_theta=10000.0, max_batch_size=32, max_seq_len=4096,
                  rope_scaling=None, load_pretrained_visual_encoder=False)
MIXTRAL_ARGS = dict(dim=64, hidden_dim=96, head_dim=16, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000,
                    norm_eps=1e-05, rope_theta=1000000.0, max_batch_size=32, max_seq_len=4096,
                    moe=dict(num_experts_per_tok=2, num_experts=4), load_balancing_weight=0.0, rope_scaling=None,
                    load_pretrained_visual_encoder=False)
MODEL_ARGS = {  # config.json of each tiny twin, as the original's dataclasses.asdict(ModelArgs) would write it
    "llama_ens": LLAMA_ARGS, "llama_ens5": LLAMA_ARGS,
    "llama_ens_light": dict(LLAMA_ARGS, n_kv_heads=2, trainable_mode="mm_stage2"),
    "llama_ens5_light": dict(LLAMA_ARGS, n_kv_heads=2, trainable_mode="mm_stage2"),
    "mixtral_sparse_ens": MIXTRAL_ARGS,
    "mixtral_sparse_ens5": dict(MIXTRAL_ARGS, trainable_mode="mm_stage2"),
}
EXPERTS = 4


def fairscale_split(key, tensor, mp):
  """Rank parts of one full tensor, as fairscale / LLaMA2-Accessory lay them out (torch.chunk, rank order)."""
  if COLUMN.match(key):
    return list(torch.chunk(tensor, mp, dim=0))
  if ROW.match(key):
    return list(torch.chunk(tensor, mp, dim=1))
  if MOE.match(key):  # every rank holds a contiguous 1/mp of each expert's rows
    return [c.reshape(-1, tensor.shape[-1]) for c in torch.chunk(tensor.view(EXPERTS, -1, tensor.shape[-1]), mp, 1)]
  return [tensor] * mp


def write_source(directory, variant, mp, tokenizer, seed=0, wrap_model=True):
  """A LLaMA2-Accessory directory for the tiny twin of `variant`; returns {key: full bf16 tensor}."""
  llama_type = VARIANTS[variant][0]
  generator = torch.Generator().manual_seed(seed)
  full = {k: torch.randn(shape, generator=generator).to(torch.bfloat16) for k, shape in golden(variant).items()}
  directory.mkdir(parents=True)
  for rank in range(mp):
    shard = {f"llma.{k}": fairscale_split(k, t, mp)[rank].clone() for k, t in full.items()}
    torch.save({"model": shard} if wrap_model else shard, directory / f"consolidated.{rank:02d}-of-{mp:02d}.model.pth")
  (directory / "config.json").write_text(json.dumps(MODEL_ARGS[llama_type]))
  (directory / "meta.json").write_text(json.dumps({"llama_type": llama_type}))
  (directory / "tokenizer.model").write_bytes(tokenizer.read_bytes())
  return full


def read_back(directory):
  """{llma-key: torch tensor} per shard file of an exported directory (weights_only)."""
  return {p.name: torch.load(p, weights_only=True) for p in sorted(directory.glob("consolidated.*"))}


# ------------------------------------------------------------------------------------------ shard rules
@pytest.mark.parametrize("mp", [2, 4])
def test_merge_and_split_follow_fairscale(mp):
  """Every rule (column, row, embedding, expert rows, replicated) merges torch.chunk parts back and splits
  into exactly those parts."""
  generator = torch.Generator().manual_seed(1)
  cases = {"layers.3.attention.wq.weight": (16, 8), "layers.0.attention.wo.weight": (8, 16),
           "layers.1.feed_forward.w1.weight": (32, 8), "layers.1.feed_forward.w2.weight": (8, 32),
           "output.weight": (20, 8), "tok_embeddings.weight": (20, 8), "layers.0.feed_forward.w2": (EXPERTS * 12, 8),
           "layers.0.feed_forward.gate.weight": (EXPERTS, 8), "norm.weight": (8,), "start_img": (1, 1, 8),
           "clip.visual.conv1.weight": (8, 3, 2, 2)}
  for key, shape in cases.items():
    full = torch.randn(shape, generator=generator)
    parts = fairscale_split(key, full, mp)
    merged = accessory.merge_shards(key, [p.numpy() for p in parts], EXPERTS, [f"f{r}" for r in range(mp)])
    np.testing.assert_array_equal(merged, full.numpy(), err_msg=key)
    for ours, theirs in zip(accessory.split_tensor(key, full.numpy(), mp, EXPERTS), parts, strict=True):
      np.testing.assert_array_equal(ours, theirs.numpy(), err_msg=key)
  # the expert rule is not the plain row rule: rank 0 holds rows of every expert
  rows = accessory.split_tensor("layers.0.feed_forward.w1", np.arange(EXPERTS * 4)[:, None], 2, EXPERTS)[0]
  assert rows[:, 0].tolist() == [0, 1, 4, 5, 8, 9, 12, 13]


def test_split_refuses_an_mp_that_does_not_divide():
  with pytest.raises(SphinxError, match=r"llma\.layers\.0\.attention\.wk\.weight.*dim 0 of size 32.*--mp 3"):
    accessory.split_tensor("layers.0.attention.wk.weight", np.zeros((32, 64)), 3, None)
  with pytest.raises(SphinxError, match=r"llma\.layers\.1\.feed_forward\.w3: cannot split 96 rows per expert"):
    accessory.split_tensor("layers.1.feed_forward.w3", np.zeros((4 * 96, 8)), 5, 4)


# ------------------------------------------------------------------------------------------- round trips
def _assert_same_directory(src, dst, full, mp):
  """dst holds mp shards whose tensors equal fairscale's split of `full` bit for bit, same keys, bf16."""
  shards = read_back(dst)
  assert sorted(shards) == [f"consolidated.{r:02d}-of-{mp:02d}.model.pth" for r in range(mp)]
  for rank, name in enumerate(sorted(shards)):
    got = shards[name]
    assert set(got) == {f"llma.{k}" for k in full}
    for key, tensor in full.items():
      want = fairscale_split(key, tensor, mp)[rank]
      out = got[f"llma.{key}"]
      assert out.dtype == torch.bfloat16 and out.shape == want.shape, key
      assert torch.equal(out.view(torch.int16), want.view(torch.int16)), key
  assert json.loads((dst / "config.json").read_text()) == json.loads((src / "config.json").read_text())
  assert json.loads((dst / "meta.json").read_text()) == json.loads((src / "meta.json").read_text())
  assert (dst / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
  assert sorted(p.name for p in dst.iterdir()) == sorted(
      ["config.json", "meta.json", "tokenizer.model"] + list(shards))


@pytest.mark.parametrize("variant,mp_in,mp_out,scan", [
    ("sphinx", 2, 1, True), ("sphinx_tiny", 1, 2, False), ("sphinx_moe", 2, 8, True)])
def test_round_trip_is_bit_exact(tmp_path, tokenizer_model, variant, mp_in, mp_out, scan):
  """Accessory (mp_in shards) -> ours -> Accessory (mp_out shards): same keys, same bits, same side files."""
  src = tmp_path / "src"
  full = write_source(src, variant, mp_in, tokenizer_model, wrap_model=mp_in == 2)
  params, config, tokenizer = accessory.import_accessory(src, scan_layers=scan, progress=False)
  assert config.model.variant == variant and config.model.llm.scan_layers == scan
  accessory.export_accessory(params, config, tokenizer, tmp_path / "out", mp=mp_out, progress=False)
  _assert_same_directory(src, tmp_path / "out", full, mp_out)


def test_import_places_decoder_and_heads_by_name(tmp_path, tokenizer_model):
  """Spot checks of the key map against the original's semantics (w1 = gate, w3 = up, Linear transposed,
  MoE w2 stored [hidden, dim] per expert, router [D, E])."""
  src = tmp_path / "src"
  full = {k: v.float().numpy() for k, v in write_source(src, "sphinx_moe", 2, tokenizer_model).items()}
  params, _, _ = accessory.import_accessory(src, scan_layers=True, progress=False)
  llm, fusion = params["llm"], params["fusion"]
  np.testing.assert_array_equal(np.asarray(llm["layers"]["attention"]["query"]["kernel"][1], np.float32),
                                full["layers.1.attention.wq.weight"].T)
  w1 = full["layers.0.feed_forward.w1"].reshape(EXPERTS, 96, 64)
  np.testing.assert_array_equal(np.asarray(llm["layers"]["moe"]["gate"][0, 2], np.float32), w1[2].T)
  w2 = full["layers.1.feed_forward.w2"].reshape(EXPERTS, 96, 64)
  np.testing.assert_array_equal(np.asarray(llm["layers"]["moe"]["down"][1, 3], np.float32), w2[3])
  np.testing.assert_array_equal(np.asarray(llm["layers"]["moe"]["router"]["kernel"][0], np.float32),
                                full["layers.0.feed_forward.gate.weight"].T)
  np.testing.assert_array_equal(np.asarray(llm["lm_head"]["kernel"], np.float32), full["output.weight"].T)
  np.testing.assert_array_equal(np.asarray(fusion["visual_proj"]["dense"]["kernel"], np.float32),
                                full["visual_proj.0.weight"].T)
  np.testing.assert_array_equal(np.asarray(fusion["qformer_proj"]["norm"]["scale"], np.float32),
                                full["qformer_proj.1.weight"])
  np.testing.assert_array_equal(np.asarray(fusion["end_img"], np.float32), full["end_img"])


def test_export_refuses_a_tree_that_does_not_match_its_config(tmp_path, tokenizer_model):
  src = tmp_path / "src"
  write_source(src, "sphinx_tiny", 1, tokenizer_model)
  params, config, tokenizer = accessory.import_accessory(src, progress=False)
  params["fusion"]["end_img"] = np.zeros((1, 1, 32), np.float32)
  with pytest.raises(SphinxError, match=r"llma\.end_img gives shape \[1, 1, 32\].*needs \[1, 1, 64\]"):
    accessory.export_accessory(params, config, tokenizer, tmp_path / "out", progress=False)
  del params["fusion"]["end_img"]
  with pytest.raises(SphinxError, match="no leaf 'fusion/end_img'"):
    accessory.export_accessory(params, config, tokenizer, tmp_path / "out", progress=False)
  assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------- the CLI
def convert(capsys, *argv):
  """Runs `sphinx-jax convert …` in-process; returns (exit code, stderr lines that are not progress bars)."""
  code = cli_main(["convert", *map(str, argv)])
  lines = capsys.readouterr().err.splitlines()
  return code, [line for line in lines if line.strip() and "tensor/s" not in line and "%|" not in line]


def assert_nothing_at(dst):
  assert not dst.exists()
  assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]


def test_cli_round_trip_through_orbax(tmp_path, tokenizer_model, capsys):
  """accessory (mp 1) -> orbax -> accessory (mp 2) with the console command; an --mp that does not divide
  the split dims fails with one line naming the tensor, and leaves nothing at DST."""
  src = tmp_path / "src"
  full = write_source(src, "sphinx_tiny_1k", 1, tokenizer_model)
  assert convert(capsys, "--from", "accessory", "--to", "orbax", src, tmp_path / "orbax")[0] == 0
  assert checkpoint.read_config(tmp_path / "orbax").model.variant == "sphinx_tiny_1k"
  assert convert(capsys, "--from", "orbax", "--to", "accessory", tmp_path / "orbax", tmp_path / "out",
                 "--mp", 2)[0] == 0
  _assert_same_directory(src, tmp_path / "out", full, 2)
  code, err = convert(capsys, "--from", "orbax", "--to", "accessory", tmp_path / "orbax", tmp_path / "bad",
                      "--mp", 3)
  assert code == 2 and len(err) == 1
  assert "llma.tok_embeddings.weight" in err[0] and "--mp 3" in err[0]
  assert_nothing_at(tmp_path / "bad")


class RunsCode:
  """Unpickling this would run a shell command (what a malicious checkpoint does)."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def _truncate(src):
  path = src / "consolidated.00-of-02.model.pth"
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  return "consolidated.00-of-02.model.pth"


def _corrupt(src):
  path = src / "consolidated.01-of-02.model.pth"
  data = bytearray(path.read_bytes())
  data[:512] = os.urandom(512)  # local headers and the pickle record's start
  path.write_bytes(bytes(data))
  return "consolidated.01-of-02.model.pth"


def _drop_shard(src):
  (src / "consolidated.01-of-02.model.pth").unlink()
  return "consolidated.01-of-02.model.pth"


def _disagree(src):
  path = src / "consolidated.01-of-02.model.pth"
  state = torch.load(path, weights_only=True)
  state["model"]["llma.norm.weight"][3] += 1
  torch.save(state, path)
  return "llma.norm.weight"


def _unknown_type(src):
  (src / "meta.json").write_text(json.dumps({"llama_type": "llama_ens7"}))
  return "'llama_ens7'.*llama_ens5_light"


def _config_mismatch(src):
  args = json.loads((src / "config.json").read_text())
  (src / "config.json").write_text(json.dumps(dict(args, multiple_of=256)))  # FFN 192 -> 256 rows
  return "config.json.*llma.layers.0.feed_forward.w1.weight"


def _too_many_layers(src):
  args = json.loads((src / "config.json").read_text())
  (src / "config.json").write_text(json.dumps(dict(args, n_layers=3)))
  return "llma.layers.2.attention.wq.weight"


def _extra_tower_block(src):
  for path in src.glob("consolidated.*"):
    state = torch.load(path, weights_only=True)
    block = {k: v for k, v in state["model"].items() if k.startswith("llma.dinov2_vitg14.blocks.1.")}
    state["model"].update({k.replace(".blocks.1.", ".blocks.2."): v for k, v in block.items()})
    torch.save(state, path)
  return r"llma.dinov2_vitg14.blocks.\{i\}: dinov2 depth is 3, neither the released tower's 40 nor the tiny twin's 2"


def _runs_code(src):
  marker = src.parent / "pwned"
  torch.save({"model": {"llma.start_img": RunsCode(marker)}}, src / "consolidated.00-of-02.model.pth")
  return "consolidated.00-of-02.model.pth: refused to unpickle"


@pytest.mark.parametrize("damage", [_truncate, _corrupt, _drop_shard, _disagree, _unknown_type, _config_mismatch,
                                    _too_many_layers, _extra_tower_block, _runs_code])
def test_bad_input_fails_with_one_line_and_writes_nothing(tmp_path, tokenizer_model, capsys, damage):
  src = tmp_path / "src"
  write_source(src, "sphinx_tiny", 2, tokenizer_model)
  expected = damage(src)
  with pytest.raises(SphinxError, match=expected):
    accessory.import_accessory(src, progress=False)
  code, err = convert(capsys, "--from", "accessory", "--to", "orbax", src, tmp_path / "dst")
  assert code == 2 and len(err) == 1 and re.search(expected, err[0]), err
  assert_nothing_at(tmp_path / "dst")
  assert not (tmp_path / "pwned").exists()
