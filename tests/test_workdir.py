"""`sphinx-jax train --workdir`: a URL is refused before anything is written (the trainer writes with local file
calls; a gs:// path would become a local directory named `gs:`)."""
from pathlib import Path

from sphinx_jax import cli

ROOT = Path(__file__).resolve().parent.parent


def test_a_url_workdir_is_refused_and_nothing_is_written(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  code = cli.main(["train", "--config", str(ROOT / "configs/llama.py:tiny"), "--workdir", "gs://bucket/run"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1
  assert err[0].startswith("sphinx-jax train: error: --workdir gs://bucket/run: URLs are not supported; give a "
                           "directory every host sees")
  assert list(tmp_path.iterdir()) == []
