from sphinx_jax.cli import main

raise SystemExit(main())
