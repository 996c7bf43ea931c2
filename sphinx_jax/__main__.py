from sphinx_jax.cli import run

raise SystemExit(run())
