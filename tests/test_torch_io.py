"""convert/torch_io.py: lazy, bit-exact, weights-only reading of .pth/.bin/.safetensors and HF directories, and
the writers; each failure mode is one SphinxError naming the file."""
import json
import pickle

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sphinx_jax.convert import torch_io
from sphinx_jax.errors import SphinxError


def random_state(seed=0):
  """fp32, bf16 (arbitrary bit patterns, NaN payloads included) and int64 tensors."""
  g = torch.Generator().manual_seed(seed)
  bf16_bits = torch.randint(-2**15, 2**15, (5, 7), generator=g, dtype=torch.int32).to(torch.int16)
  return {"a.weight": torch.randn(3, 4, generator=g), "b.bf16": bf16_bits.view(torch.bfloat16),
          "c.ids": torch.arange(6).reshape(2, 3), "d.scalar": torch.tensor(2.5)}


def bits(tensor: torch.Tensor) -> bytes:
  return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_bits_equal(array: np.ndarray, tensor: torch.Tensor):
  assert tuple(array.shape) == tuple(tensor.shape)
  assert torch_io.dtype_name(array.dtype) == torch_io.dtype_name(tensor.dtype)
  assert np.ascontiguousarray(array).tobytes() == bits(tensor)


@pytest.mark.parametrize("wrap", [False, True])
def test_pth_reads_bare_or_wrapped_state_dict_bit_exactly(tmp_path, wrap):
  state = random_state()
  torch.save({"model": state} if wrap else state, tmp_path / "x.pth")
  f = torch_io.PthFile(tmp_path / "x.pth")
  assert sorted(f.keys()) == sorted(state)
  for key, tensor in state.items():
    assert f.spec(key) == (tuple(tensor.shape), torch_io.dtype_name(tensor.dtype))
    assert_bits_equal(f.read(key), tensor)
  assert f.read("b.bf16").dtype == ml_dtypes.bfloat16


def test_safetensors_reads_bit_exactly_and_lazily(tmp_path, monkeypatch):
  state = random_state()
  save_file(state, tmp_path / "x.safetensors")
  source = torch_io.TensorSource([torch_io.SafetensorsFile(tmp_path / "x.safetensors")])
  assert sorted(source) == sorted(state) and len(source) == 4
  assert source.spec("b.bf16") == ((5, 7), "bfloat16")
  for key, tensor in state.items():
    assert_bits_equal(source[key], tensor)
  # Membership and specs come from the header: no tensor is read for them.
  monkeypatch.setattr(torch_io.SafetensorsFile, "read", lambda self, key: pytest.fail(f"read {key}"))
  assert "a.weight" in source and "zzz" not in source
  assert source.spec("a.weight") == ((3, 4), "float32")


def test_writers_round_trip_through_torch_and_safetensors(tmp_path):
  state = random_state()
  items = [(k, torch_io.to_numpy(v)) for k, v in state.items()]
  torch_io.save_pth(tmp_path / "out.pth", items)
  back = torch.load(tmp_path / "out.pth", weights_only=True)
  assert sorted(back) == sorted(state) and back["b.bf16"].dtype == torch.bfloat16
  for key, tensor in state.items():
    assert bits(back[key]) == bits(tensor) and back[key].shape == tensor.shape

  (tmp_path / "hf").mkdir()
  names = torch_io.save_safetensors_shards(tmp_path / "hf", items, max_shard_bytes=60)
  assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]  # 48 | 70 | 48+4 bytes
  index = json.loads((tmp_path / "hf" / torch_io.SAFETENSORS_INDEX).read_text())
  assert index["metadata"]["total_size"] == sum(a.nbytes for _, a in items)
  assert set(index["weight_map"]) == set(state)
  assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == sorted(names + [torch_io.SAFETENSORS_INDEX])
  for name in names:
    with safe_open(tmp_path / "hf" / name, "pt") as f:
      assert f.metadata() == {"format": "pt"}
    for key, tensor in load_file(tmp_path / "hf" / name).items():
      assert index["weight_map"][key] == name
      assert bits(tensor) == bits(state[key]) and tensor.dtype == state[key].dtype
  source = torch_io.open_hf_weights(tmp_path / "hf")
  for key, tensor in state.items():
    assert_bits_equal(source[key], tensor)
    assert source.file_of(key).name == index["weight_map"][key]


def test_single_shard_has_no_index_and_bin_dirs_read(tmp_path):
  state = random_state()
  (tmp_path / "one").mkdir()
  items = [(k, torch_io.to_numpy(v)) for k, v in state.items()]
  assert torch_io.save_safetensors_shards(tmp_path / "one", items) == ["model.safetensors"]
  assert not (tmp_path / "one" / torch_io.SAFETENSORS_INDEX).exists()
  (tmp_path / "bin").mkdir()
  torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
  source = torch_io.open_hf_weights(tmp_path / "bin")
  assert_bits_equal(source["b.bf16"], state["b.bf16"])


def test_duplicate_key_written_twice_is_refused(tmp_path):
  with pytest.raises(SphinxError, match="'x' produced twice"):
    torch_io.save_safetensors_shards(tmp_path, [("x", np.ones(1)), ("x", np.ones(1))])


# ------------------------------------------------------------------------------------------- failures
def test_weights_only_refuses_code_and_runs_none(tmp_path):
  marker = tmp_path / "code_ran"

  class Payload:
    def __reduce__(self):
      return (open, (str(marker), "w"))

  torch.save({"w": torch.ones(2), "evil": Payload()}, tmp_path / "evil.pth")
  with pytest.raises(SphinxError, match=rf"^{tmp_path / 'evil.pth'}: refused to unpickle"):
    torch_io.PthFile(tmp_path / "evil.pth")
  assert not marker.exists()
  (tmp_path / "legacy.pth").write_bytes(pickle.dumps({"evil": Payload()}))
  with pytest.raises(SphinxError, match=rf"^{tmp_path / 'legacy.pth'}: not a torch zip checkpoint"):
    torch_io.PthFile(tmp_path / "legacy.pth")
  assert not marker.exists()


def test_non_tensor_entries_are_refused(tmp_path):
  torch.save({"w": torch.ones(2), "step": 3}, tmp_path / "x.pth")
  with pytest.raises(SphinxError, match="entry 'step' is a int, not a tensor"):
    torch_io.PthFile(tmp_path / "x.pth")


def test_truncated_files_are_named(tmp_path):
  torch.save(random_state(), tmp_path / "x.pth")
  save_file(random_state(), tmp_path / "x.safetensors")
  for name in ("x.pth", "x.safetensors"):
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(SphinxError, match=rf"^{tmp_path / name}: .*(truncated|corrupt)"):
      torch_io.open_file(tmp_path / name)


def test_missing_files_and_bad_index(tmp_path):
  with pytest.raises(SphinxError, match="no such file"):
    torch_io.open_file(tmp_path / "absent.safetensors")
  with pytest.raises(SphinxError, match="no weights found"):
    torch_io.open_hf_weights(tmp_path)
  save_file({"a": torch.ones(1)}, tmp_path / "s1.safetensors")
  (tmp_path / torch_io.SAFETENSORS_INDEX).write_text(json.dumps({"weight_map": {"a": "s1.safetensors",
                                                                                "b": "s1.safetensors"}}))
  with pytest.raises(SphinxError, match=rf"^{tmp_path / torch_io.SAFETENSORS_INDEX}: names tensor 'b' in "
                                        "s1.safetensors, which does not hold it"):
    torch_io.open_hf_weights(tmp_path)
  (tmp_path / torch_io.SAFETENSORS_INDEX).write_text("{")
  with pytest.raises(SphinxError, match=rf"^{tmp_path / torch_io.SAFETENSORS_INDEX}: not valid JSON"):
    torch_io.open_hf_weights(tmp_path)


def test_a_tensor_in_two_files_is_refused(tmp_path):
  save_file({"a": torch.ones(1)}, tmp_path / "s1.safetensors")
  save_file({"a": torch.zeros(1)}, tmp_path / "s2.safetensors")
  with pytest.raises(SphinxError, match="tensor 'a' also in"):
    torch_io.TensorSource([torch_io.SafetensorsFile(tmp_path / n) for n in ("s1.safetensors", "s2.safetensors")])
