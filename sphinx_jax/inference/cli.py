"""`sphinx-jax generate --ckpt DIR [--image PATH] --prompt TEXT [--temperature T --top-p P --max-new-tokens N]`.

Streams the reply to stdout (the original's `stream_generate`); when the reply holds boxes or points
(SPHINX.md §7 format) the image is written with them drawn and labelled (inference/render.py) to --out
(default: <image name>_sphinx.png in the current directory) and the path is printed on stderr.
"""
from __future__ import annotations

import sys
from pathlib import Path


def add_generate_parser(subparsers):
  p = subparsers.add_parser("generate", help="chat with a checkpoint about an image")
  p.add_argument("--ckpt", required=True, help="model directory (train, convert or mix output)")
  p.add_argument("--image", default=None, help="image file (omit for a text-only question)")
  p.add_argument("--prompt", required=True, help="the question; rendered in the SPHINX chat template")
  p.add_argument("--temperature", type=float, default=0.1)
  p.add_argument("--top-p", type=float, default=0.5)
  p.add_argument("--max-new-tokens", type=int, default=512)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="where to write the image with predicted boxes/points drawn")
  p.set_defaults(func=run)


def run(args) -> int:
  import sphinx_jax
  from sphinx_jax.data import conversation, image as image_data
  from sphinx_jax.inference.render import parse_marks, render_answer

  model = sphinx_jax.load(args.ckpt)
  pixels = None if args.image is None else model.pixels(args.image)
  prompt = conversation.render_prompt([], args.prompt)
  pieces = []
  for delta in model.generator.stream(prompt, pixels, max_new_tokens=args.max_new_tokens,
                                      temperature=args.temperature, top_p=args.top_p, seed=args.seed):
    pieces.append(delta)
    sys.stdout.write(delta)
    sys.stdout.flush()
  sys.stdout.write("\n")
  answer = "".join(pieces)
  if args.image is not None and parse_marks(answer):
    out = Path(args.out or f"{Path(args.image).stem}_sphinx.png")
    render_answer(image_data.load_rgb(args.image), answer).save(out)
    print(f"drawn: {out}", file=sys.stderr)
  return 0
