"""The training run's directory: a filesystem path that every process of the job sees.

Orbax writes each checkpoint collectively (every process writes its own shards into the same directory and
process 0 commits it), so on a multi-host slice WORKDIR must be shared: a bucket mounted with gcsfuse, NFS,
Filestore. A worker's local disk would silently hold a fraction of each checkpoint. URLs (gs://...) are refused:
the logs, the summary and the drawn predictions are written with local file calls. The original
(LLaMA2-Accessory) likewise expects one `--output_dir` that all its nodes save their shards into.
"""
from __future__ import annotations

import re
import secrets
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from sphinx_jax.errors import SphinxError

URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
MOUNTS = "a directory every host sees: the bucket mounted with gcsfuse (e.g. /gcs/<bucket>/run), NFS or Filestore"


def local_workdir(workdir) -> Path:
  """`workdir` as a Path; a URL is refused before anything is written."""
  if URL.match(str(workdir)):
    raise SphinxError(f"--workdir {workdir}: URLs are not supported; give {MOUNTS}.")
  return Path(workdir)


def check_shared(workdir: Path) -> None:
  """Every process reads the token process 0 wrote into `workdir`, or every process raises naming those that
  did not. One process: nothing to check."""
  if jax.process_count() == 1:
    return
  token = int(multihost_utils.broadcast_one_to_all(np.int32(secrets.randbits(31))))
  marker = workdir / f".shared_check_{token}"
  if jax.process_index() == 0:
    marker.write_text(str(token))
  multihost_utils.sync_global_devices("workdir marker written")
  sees = np.int32(marker.is_file() and marker.read_text() == str(token))
  everyone = multihost_utils.process_allgather(sees)
  multihost_utils.sync_global_devices("workdir marker read")
  if jax.process_index() == 0:
    marker.unlink()
  if blind := [i for i, seen in enumerate(np.asarray(everyone).ravel()) if not seen]:
    raise SphinxError(f"--workdir {workdir}: processes {blind} do not see the files process 0 writes there, so "
                      f"checkpoints would be split across hosts; give {MOUNTS}.")
