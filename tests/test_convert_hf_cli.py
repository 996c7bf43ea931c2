"""`sphinx-jax convert` hf <-> orbax through the real CLI: bit-identical round trips, logits parity with
transformers, tokenizer carried through, and bad input refused with one line and nothing left at DST."""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

import sphinx_jax
from sphinx_jax import checkpoint
from sphinx_jax.cli import main

from checkpoint_helpers import (hf_logits, read_safetensors_dir, save_hf_dir, tiny_hf_llama,
                                train_tokenizer)

REPO = Path(__file__).resolve().parents[1]
TOKENS = np.array([[1, 5, 17, 99, 3, 64, 127, 0, 42], [1, 2, 3, 4, 5, 6, 7, 8, 9]], np.int32)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return train_tokenizer(tmp_path_factory.mktemp("spm") / "tokenizer.model")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, tokenizer):
  """fp32 model saved in 100 KB shards (index.json path), bf16 model as one model.safetensors."""
  root = tmp_path_factory.mktemp("hf")
  fp32 = tiny_hf_llama(torch.float32)
  bf16 = tiny_hf_llama(torch.bfloat16, seed=1)
  return {
      "fp32": (fp32, save_hf_dir(fp32, root / "fp32", tokenizer, max_shard_size="100KB")),
      "bf16": (bf16, save_hf_dir(bf16, root / "bf16", tokenizer)),
  }


def convert(*argv) -> int:
  return main(["convert", *map(str, argv)])


def assert_same_tensors(a: dict, b: dict):
  assert sorted(a) == sorted(b)
  for key in a:
    assert a[key].dtype == b[key].dtype, key
    assert a[key].shape == b[key].shape, key
    assert torch.equal(a[key].view(torch.uint8), b[key].view(torch.uint8)), key  # bits, not values


def siblings(path: Path) -> list[str]:
  return sorted(p.name for p in path.parent.iterdir())


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("kind", ["fp32", "bf16"])
def test_hf_orbax_hf_roundtrip_is_bit_identical(kind, scan, hf_dirs, tokenizer, tmp_path):
  model, src = hf_dirs[kind]
  orbax, back = tmp_path / "orbax", tmp_path / "back"
  scan_flag = "--scan" if scan else "--no-scan"
  assert convert("--from", "hf", "--to", "orbax", src, orbax, scan_flag) == 0
  # A small shard size proves the sharded writer (index.json) end to end.
  assert convert("--from", "orbax", "--to", "hf", orbax, back, "--max-shard-bytes", 150_000) == 0
  assert siblings(orbax) == ["back", "orbax"]  # no temporary directories left behind

  assert_same_tensors(read_safetensors_dir(src), read_safetensors_dir(back))
  assert (back / "model.safetensors.index.json").exists()
  assert (orbax / "tokenizer.model").read_bytes() == tokenizer.read_bytes()
  assert (back / "tokenizer.model").read_bytes() == tokenizer.read_bytes()

  config = checkpoint.read_config(orbax)
  assert config.model.towers == () and config.model.llm.scan_layers is scan
  leaves = checkpoint.abstract_params(orbax)
  layer_leaf = "llm/layers/mlp/gate/kernel" if scan else "llm/layers_1/mlp/gate/kernel"
  assert leaves[layer_leaf].shape == ((2, 64, 172) if scan else (64, 172))
  assert str(leaves[layer_leaf].dtype) == {"fp32": "float32", "bf16": "bfloat16"}[kind]

  # Both loaded the same way (dtype from config.json), so identical files must give identical logits.
  original = LlamaForCausalLM.from_pretrained(src, attn_implementation="eager", dtype="auto")
  exported = LlamaForCausalLM.from_pretrained(back, attn_implementation="eager", dtype="auto")
  assert exported.dtype == model.dtype
  torch.testing.assert_close(hf_logits(exported, TOKENS), hf_logits(original, TOKENS), rtol=0, atol=0)


@pytest.mark.parametrize("scan", [True, False])
def test_loaded_logits_match_transformers(scan, hf_dirs, tmp_path):
  model, src = hf_dirs["fp32"]
  assert convert("--from", "hf", "--to", "orbax", src, tmp_path / "o", "--scan" if scan else "--no-scan") == 0
  handle = sphinx_jax.load(tmp_path / "o")
  ours = handle.logits(TOKENS)
  np.testing.assert_allclose(ours, hf_logits(model, TOKENS).numpy(), rtol=0, atol=1e-4)
  assert handle.tokenizer.encode("red square", bos=True, eos=False)[0] == 1


def test_python_m_subprocess_and_dtype_cast(hf_dirs, tmp_path):
  """The installed entry point (`python -m sphinx_jax`), with --dtype bf16 casting fp32 weights on the way."""
  model, src = hf_dirs["fp32"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, "-m", "sphinx_jax", "convert", "--from", "hf", "--to", "orbax",
                        str(src), str(tmp_path / "o"), "--dtype", "bf16"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr
  assert convert("--from", "orbax", "--to", "hf", tmp_path / "o", tmp_path / "back") == 0
  expected = {k: v.to(torch.bfloat16) for k, v in read_safetensors_dir(src).items()}
  assert_same_tensors(expected, read_safetensors_dir(tmp_path / "back"))
  assert checkpoint.read_config(tmp_path / "o").model.param_dtype == "bfloat16"


def test_orbax_to_orbax_relayout_keeps_values(hf_dirs, tmp_path):
  _, src = hf_dirs["fp32"]
  assert convert("--from", "hf", "--to", "orbax", src, tmp_path / "scanned") == 0
  assert convert("--from", "orbax", "--to", "orbax", tmp_path / "scanned", tmp_path / "loop", "--no-scan") == 0
  key = "attention/key/kernel"
  scanned = checkpoint.restore_leaves(tmp_path / "scanned", [f"llm/layers/{key}"])[f"llm/layers/{key}"]
  loop = checkpoint.restore_leaves(tmp_path / "loop", [f"llm/layers_{i}/{key}" for i in (0, 1)])
  for i in (0, 1):
    np.testing.assert_array_equal(scanned[i], loop[f"llm/layers_{i}/{key}"])
  assert checkpoint.read_config(tmp_path / "loop").model.llm.scan_layers is False


def test_pytorch_model_bin_source_gives_the_same_model(hf_dirs, tmp_path):
  model, src = hf_dirs["fp32"]
  model.save_pretrained(tmp_path / "bin", safe_serialization=False)
  assert (tmp_path / "bin" / "pytorch_model.bin").exists()
  assert convert("--from", "hf", "--to", "orbax", tmp_path / "bin", tmp_path / "from_bin") == 0
  assert convert("--from", "hf", "--to", "orbax", src, tmp_path / "from_st") == 0
  from_bin, _, _ = checkpoint.load_model_dir(tmp_path / "from_bin")
  from_st, _, _ = checkpoint.load_model_dir(tmp_path / "from_st")
  assert checkpoint.flatten(from_bin).keys() == checkpoint.flatten(from_st).keys()
  jax.tree.map(np.testing.assert_array_equal, from_bin, from_st)


# ------------------------------------------------------------------------------------------- bad input
def copy_hf(src: Path, dst: Path, edit=None) -> Path:
  """A single-file copy of an HF dir; `edit(tensors)` changes the tensor dict before it is written."""
  dst.mkdir()
  tensors = read_safetensors_dir(src)
  if edit:
    edit(tensors)
  save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
  (dst / "config.json").write_bytes((src / "config.json").read_bytes())
  return dst


def expect_refusal(capsys, src, dst, *needles):
  code = convert("--from", "hf", "--to", "orbax", src, dst)
  err = capsys.readouterr().err
  error_lines = [line for line in err.splitlines() if "error:" in line]
  assert code == 2
  assert len(error_lines) == 1 and error_lines[0].startswith("sphinx-jax convert: error:"), err
  for needle in needles:
    assert needle in error_lines[0], error_lines[0]
  assert not dst.exists()
  assert not [n for n in siblings(dst) if n.startswith(f".{dst.name}")], "temporary directory left behind"
  return error_lines[0]


def test_missing_tensor(hf_dirs, tmp_path, capsys):
  key = "model.layers.1.mlp.up_proj.weight"
  src = copy_hf(hf_dirs["fp32"][1], tmp_path / "src", lambda t: t.pop(key))
  expect_refusal(capsys, src, tmp_path / "dst", key, "missing")


def test_extra_tensor(hf_dirs, tmp_path, capsys):
  key = "model.layers.0.self_attn.rotary_emb.inv_freq"
  src = copy_hf(hf_dirs["fp32"][1], tmp_path / "src", lambda t: t.update({key: torch.ones(8)}))
  expect_refusal(capsys, src, tmp_path / "dst", key)


def test_misshaped_tensor(hf_dirs, tmp_path, capsys):
  key = "model.layers.0.self_attn.k_proj.weight"
  src = copy_hf(hf_dirs["fp32"][1], tmp_path / "src", lambda t: t.update({key: torch.zeros(64, 64)}))
  expect_refusal(capsys, src, tmp_path / "dst", key, "(64, 64)", "(32, 64)")


def test_truncated_safetensors(hf_dirs, tmp_path, capsys):
  src = copy_hf(hf_dirs["fp32"][1], tmp_path / "src")
  data = (src / "model.safetensors").read_bytes()
  (src / "model.safetensors").write_bytes(data[: len(data) - 1000])
  expect_refusal(capsys, src, tmp_path / "dst", str(src / "model.safetensors"), "truncated")


class _Marker:
  """Unpickling this calls open(path, "w"), creating a file: proof that code ran."""

  def __init__(self, path):
    self.path = str(path)

  def __reduce__(self):
    return (open, (self.path, "w"))


def test_malicious_pth_is_not_unpickled(hf_dirs, tmp_path, capsys):
  marker = tmp_path / "code_ran"
  src = tmp_path / "src"
  src.mkdir()
  (src / "config.json").write_bytes((hf_dirs["fp32"][1] / "config.json").read_bytes())
  torch.save({"model.embed_tokens.weight": torch.zeros(2), "payload": _Marker(marker)}, src / "pytorch_model.bin")
  # Sanity: the same payload does run under an unrestricted unpickler.
  witness = tmp_path / "witness"
  torch.save({"payload": _Marker(witness)}, tmp_path / "witness.bin")
  torch.load(tmp_path / "witness.bin", weights_only=False)
  assert witness.exists() and not marker.exists()
  expect_refusal(capsys, src, tmp_path / "dst", str(src / "pytorch_model.bin"), "refused")
  assert not marker.exists()
  # A plain (non-zip) pickle is refused before any unpickling, too.
  (src / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Marker(marker)}))
  expect_refusal(capsys, src, tmp_path / "dst", str(src / "pytorch_model.bin"))
  assert not marker.exists()


def test_bad_config_json(hf_dirs, tmp_path, capsys):
  src = copy_hf(hf_dirs["fp32"][1], tmp_path / "src")
  (src / "config.json").write_text("{not json")
  expect_refusal(capsys, src, tmp_path / "dst", str(src / "config.json"), "JSON")
  (src / "config.json").unlink()
  expect_refusal(capsys, src, tmp_path / "dst", str(src / "config.json"))


def test_existing_destination_is_refused_then_overwritten(hf_dirs, tmp_path, capsys):
  src = hf_dirs["fp32"][1]
  dst = tmp_path / "dst"
  dst.mkdir()
  (dst / "keep.txt").write_text("mine")
  assert convert("--from", "hf", "--to", "orbax", src, dst) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"sphinx-jax convert: error: {dst}: exists and is not empty; choose another destination or "
                 "pass --overwrite."]
  assert sorted(p.name for p in dst.iterdir()) == ["keep.txt"]
  assert convert("--from", "hf", "--to", "orbax", src, dst, "--overwrite") == 0
  assert not (dst / "keep.txt").exists() and (dst / "metadata.json").exists()
  assert siblings(dst) == ["dst"]


def test_vision_model_cannot_go_to_hf(tmp_path, capsys):
  from configs.sphinx import get_config
  config = get_config("tiny_sphinx_tiny")
  checkpoint.save_model_dir(tmp_path / "o", {"llm": {"w": np.ones(2, np.float32)},
                                             "fusion": {"start_img": np.ones((1, 1, 2), np.float32)}}, config)
  assert main(["convert", "--from", "orbax", "--to", "hf", str(tmp_path / "o"), str(tmp_path / "hf")]) == 2
  assert "vision towers" in capsys.readouterr().err
  assert not (tmp_path / "hf").exists()
