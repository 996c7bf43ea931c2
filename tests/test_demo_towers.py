"""The demo's pre-trained towers (configs/assets/demo_towers, made by configs/assets/make_demo_towers.py): the dense
labels they were trained on, that the committed directory fits the demo's model, and that its towers describe
unseen scenes (the saved read-out heads re-scored on scenes of another seed)."""
import jax
import numpy as np
from flax import linen as nn

from configs import demo
from configs.assets import make_demo_towers as towers_script
from sphinx_jax import checkpoint
from sphinx_jax.config import patch_grid
from sphinx_jax.data import shapes, tasks
from sphinx_jax.models.sphinx import Sphinx
from sphinx_jax.train import loop


def test_dense_labels_mark_the_patches_whose_centre_is_in_the_box():
  # a 200 x 100 image pads to a 200-px square (offset 50 down); the square covers x 0..100, y 0..50 -> in the padded
  # square [0, 0.5] x [0.25, 0.5]: on a 4x4 grid (centres 0.125, 0.375, ...) columns 0-1 of row 1
  square = shapes.Shape("square", "blue", (0, 0, 100, 50))
  labels = towers_script.dense_labels(tasks.Frame(200, 100), [square], 4)
  expected = np.zeros(16, int)
  expected[[4, 5]] = 1
  np.testing.assert_array_equal(labels["shape"] > 0, expected > 0)
  assert set(labels["shape"][[4, 5]]) == {shapes.SHAPES.index("square") + 1}
  assert set(labels["colour"][[4, 5]]) == {list(shapes.COLORS).index("blue") + 1}
  np.testing.assert_allclose(labels["box"][4], [0.0, 0.25, 0.5, 0.5])
  # the REC answer prints this box as [0.00,0.25,0.50,0.50]
  np.testing.assert_array_equal(labels["digits"][[4, 5]], [[0, 0, 0, 0, 2, 5, 0, 5, 0, 0, 5, 0]] * 2)
  assert not labels["box"][expected == 0].any() and not labels["digits"][expected == 0].any()
  pairs = labels["pairs"]
  assert pairs.sum() == 1 and pairs[towers_script.PAIRS.index(("square", "blue"))] == 1
  np.testing.assert_array_equal(labels["counts"], [shape == "square" for shape in shapes.SHAPES])


def test_code_target_is_the_scaled_one_hots_of_object_colour_shape_and_tenths():
  square = shapes.Shape("square", "blue", (0, 0, 100, 50))  # prints [0.00,0.25,0.50,0.50] (test above)
  labels = towers_script.dense_labels(tasks.Frame(200, 100), [square], 4)
  code = np.asarray(towers_script.code_target(labels))
  colours, kinds = len(shapes.COLORS), len(shapes.SHAPES)
  expected = np.zeros(towers_script.CODE)
  expected[[0, 1 + list(shapes.COLORS).index("blue"), 1 + colours + shapes.SHAPES.index("square")]] = 1
  expected[1 + colours + kinds + 10 * np.arange(4) + np.array([0, 2, 5, 5])] = 1
  np.testing.assert_array_equal(code[4], towers_script.CODE_SCALE * expected)
  assert not code[[0, 1, 2, 3, 6]].any()  # background patches carry no code


def test_printed_digits_follow_the_answer_text():
  assert towers_script.printed_digits([0.526, 0.0, 1.0, 0.999]) == [0, 5, 3, 0, 0, 0, 1, 0, 0, 1, 0, 0]


def test_the_committed_towers_fit_the_demo_model():
  c = demo.get_config()
  model = Sphinx(c.model)
  abstract = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *loop.init_inputs(c.model)))
  expected = {f"towers/{p}": s.shape for p, s in checkpoint.flatten(abstract["params"]["towers"]).items()}
  stored = {p: s.shape for p, s in checkpoint.abstract_params(c.train.towers_from).items()
            if p.startswith("towers/")}
  assert stored == expected


def test_the_committed_towers_describe_unseen_scenes():
  c = demo.get_config()
  params = checkpoint.load_model_dir(c.train.towers_from)[0]
  world = shapes.World(seed=12_345, max_objects=demo.MAX_OBJECTS, object_sides=demo.OBJECT_SIDES)
  pixels, labels = towers_script.scene_batch(world, 0, 48, c.model.image_size, patch_grid(c.model))
  scores = towers_script.accuracy(jax.jit(towers_script.build(c.model)[2])(params, pixels), labels)
  # chance: shape 1/3, colour 1/6 (random towers: 59-64% shape at patch 14, NOTES.md); a box error of 0.03 is
  # ~7 px of the 224-px view; printed digits 0.4 (the units digit is almost always 0, the others 1/10), a printed
  # coordinate within 0.02 ~0.05; counts 0.53 (each shape's most frequent count); the code's tenths 0.1, and a
  # token's 7 true code directions hold ~7 / 224 of its energy when random. On these scenes the
  # committed towers score object 0.99, shape 0.98, colour 1.00, box L1 0.022, digits 0.63, within 0.02 0.38,
  # counts 0.79, code tenths 0.76 on 0.21 of the energy.
  assert scores["object_acc"] > 0.95 and scores["colour_acc"] > 0.95, scores
  assert scores["shape_acc"] > 0.9 and scores["box_l1"] < 0.03, scores
  assert scores["digits_acc"] > 0.5 and scores["printed_within_0.02"] > 0.2 and scores["counts_acc"] > 0.6, scores
  assert scores["code_tenths_acc"] > 0.6 and scores["code_energy"] > 0.1, scores
