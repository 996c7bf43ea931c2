"""conv_v1_2 rendering and FinetuneDialogDataset's tokenisation, checked against an independent
implementation of the original rule (SPHINX.md §6) written here with sentencepiece alone, on the real
Mistral v1 model and on tiny trained models of both segment styles."""
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm

from fixtures_text import mistral_v1_path, train_spm
from sphinx_jax.data import conversation as conv
from sphinx_jax.data import shapes, tasks
from sphinx_jax.data.tokenizer import Tokenizer
from sphinx_jax.errors import SphinxError
from sphinx_jax.models.layers import attention_mask

SYSTEM_TEXT = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
               "helpful, detailed, and polite answers to the human's questions.")
IGNORE = -100

# name -> (model proto, does a cut-out segment need an explicit leading space)
MODELS = {
    "mistral_v1": (lambda: open(mistral_v1_path(), "rb").read(), False),
    "tiny": (lambda: train_spm(), False),
    "tiny_no_dummy_prefix": (lambda: train_spm(add_dummy_prefix=False), True),
}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
  proto, space_before = MODELS[request.param]
  data = proto()
  return Tokenizer(data), spm.SentencePieceProcessor(model_proto=data), space_before


def reference(sp, space_before, conversations, max_words, image_words):
  """The original rule, spelled out: (tokens, loss_mask, length) after truncation and -1 padding -> 0."""
  text = SYSTEM_TEXT + "\n\n###"
  replies = []
  for turn in conversations:
    value = turn["value"].replace("<image>", "").strip()
    role = "Human" if turn["from"] == "human" else "Assistant"
    text += " " + role + ": " + value + "\n###"
    if role == "Assistant":
      replies.append(value + "\n###")
  ids = [sp.bos_id()] + sp.encode(text) + [sp.eos_id()]
  labels = [IGNORE] * len(ids)
  start = 0
  for reply in replies:
    seg = sp.encode((" " if space_before else "") + reply.lstrip(" "))
    at = next(i for i in range(start, len(ids) - len(seg) + 1) if ids[i:i + len(seg)] == seg)
    labels[at:at + len(seg)] = seg
    start = at + len(seg)
  limit = max_words - image_words
  length = min(len(ids), limit)
  ids = (ids + [-1] * limit)[:limit]
  labels = (labels + [-1] * limit)[:limit]
  return [max(t, 0) for t in ids], [lab > 0 for lab in labels], length


def turn(who, value):
  return {"from": who, "value": value}


DIALOGS = {
    "single": [turn("human", "What color is the circle?" + tasks.SHORT_ANSWER), turn("gpt", "red")],
    "multi_with_image_tag": [
        turn("human", "<image>\nWhat is in the image?"), turn("gpt", "  A red circle and a blue square.  "),
        turn("human", "How many squares are there?"), turn("assistant", "1"),
        turn("human", "Where is the circle?"), turn("gpt", "[0.26,0.23,0.52,0.82]")],
    "scienceqa_answer": [
        turn("human", tasks.multiple_choice_prompt("Which is a mammal?", ["frog", "whale"], context="Biology.")),
        turn("gpt", "The answer is B.")],
    "grounded": [turn("human", tasks.GROUNDED_CAPTION_PROMPT),
                 turn("gpt", "There is a <p>red circle</p>[0.01,0.41,0.14,0.54] and a <p>cat</p>[0.1,0.2,0.3,0.4].")],
}


@pytest.mark.parametrize("name", list(DIALOGS))
@pytest.mark.parametrize("image_words", [0, 37])
def test_matches_original_rule(model, name, image_words):
  tok, sp, space_before = model
  dialog = DIALOGS[name]
  max_len = 512 + image_words
  sample = conv.tokenize_dialog(tok, dialog, max_len=max_len, image_words=image_words, record_id=name)
  tokens, mask, length = reference(sp, space_before, dialog, max_len, image_words)
  assert sample.tokens.dtype == np.int32 and sample.tokens.shape == (512,)
  assert sample.tokens.tolist() == tokens
  assert sample.loss_mask.tolist() == mask
  assert sample.length == length
  # the labelled tokens are exactly the replies with their terminators, nothing of the human side
  replies = [t["value"].strip() for t in dialog if t["from"] != "human"]
  assert sp.decode(sample.tokens[sample.loss_mask].tolist()).count("###") == len(replies)


def test_truncation_counts_image_tokens(model):
  tok, sp, space_before = model
  dialog = DIALOGS["multi_with_image_tag"]
  full, _, full_len = reference(sp, space_before, dialog, 10_000, 0)
  image_words = 291
  # cut inside the last reply: its tail and the EOS are lost, earlier replies stay labelled
  max_len = image_words + full_len - 6
  sample = conv.tokenize_dialog(tok, dialog, max_len=max_len, image_words=image_words)
  tokens, mask, length = reference(sp, space_before, dialog, max_len, image_words)
  assert sample.length == length == full_len - 6 and sample.tokens.shape == (full_len - 6,)
  assert sample.tokens.tolist() == tokens == full[:full_len - 6]
  assert sample.loss_mask.tolist() == mask and any(mask)


def test_world_records(model):
  tok, sp, space_before = model
  world = shapes.World(seed=7)
  for task in shapes.WORLD_TASKS:
    _, record, _ = world.sample(3, task)
    sample = conv.tokenize_dialog(tok, record.conversations, max_len=1024, image_words=291, record_id=record.id)
    tokens, mask, length = reference(sp, space_before, record.conversations, 1024, 291)
    assert (sample.tokens.tolist(), sample.loss_mask.tolist(), sample.length) == (tokens, mask, length), task


def test_rendering_is_exact():
  text, replies = conv.render(conv.turns_of([turn("human", "<image>\nHi"), turn("gpt", "Hello")]))
  assert text == SYSTEM_TEXT + "\n\n### Human: Hi\n### Assistant: Hello\n###"
  assert replies == ["Hello\n###"]
  prompt = conv.render_prompt([("What is it?", "A circle.")], "What color?", prefill=tasks.SCIENCEQA_PREFILL)
  assert prompt == (SYSTEM_TEXT + "\n\n### Human: What is it?\n### Assistant: A circle.\n### Human: What color?"
                    "\n### Assistant: The answer is")
  assert conv.render_prompt([], "Q") == SYSTEM_TEXT + "\n\n### Human: Q\n### Assistant:"
  assert conv.STOP == "\n###"
  assert conv.cut_reply(" B.\n### Human: more") == " B."


def test_prompt_ids_with_prefill(model):
  tok, sp, _ = model
  ids = conv.encode_prompt(tok, [], "Which is a mammal?", prefill=" The answer is")
  expected = SYSTEM_TEXT + "\n\n### Human: Which is a mammal?\n### Assistant: The answer is"
  assert ids == [sp.bos_id()] + sp.encode(expected)


def test_bad_dialogs():
  tok = Tokenizer(train_spm())
  with pytest.raises(SphinxError, match="record r1: turn 1 has unknown speaker 'robot'"):
    conv.tokenize_dialog(tok, [turn("human", "a"), turn("robot", "b")], max_len=64, record_id="r1")
  with pytest.raises(SphinxError, match="record r2: turn 0 is not"):
    conv.tokenize_dialog(tok, [{"value": "a"}], max_len=64, record_id="r2")
  with pytest.raises(SphinxError, match="record r5: 'conversations' is a str"):
    conv.tokenize_dialog(tok, "Hi", max_len=64, record_id="r5")
  with pytest.raises(SphinxError, match="record r3: no assistant turn"):
    conv.tokenize_dialog(tok, [turn("human", "a")], max_len=64, record_id="r3")
  with pytest.raises(SphinxError, match="record r4: nothing left to predict after truncation to 9"):
    conv.tokenize_dialog(tok, DIALOGS["single"], max_len=300, image_words=291, record_id="r4")
  with pytest.raises(SphinxError, match="max_len=256 leaves no room"):
    conv.tokenize_dialog(tok, DIALOGS["single"], max_len=256, image_words=291)
  with pytest.raises(SphinxError, match="only the last turn"):
    conv.render([("Human", None), ("Assistant", "x")])


def test_pack_keeps_samples_apart():
  tok = Tokenizer(train_spm())
  pairs = [("Hi", "Hello"), ("Color?", "red"), ("Shape?", "a circle")]
  dialogs = [[turn("human", q), turn("gpt", a)] for q, a in pairs]
  samples = [conv.tokenize_dialog(tok, d, max_len=400) for d in dialogs]
  lengths = [s.length for s in samples]
  row_len = lengths[0] + lengths[1] + 3
  rows = conv.pack(samples, row_len)
  assert len(rows) == 2
  first = rows[0]
  n0, n1 = lengths[0], lengths[1]
  np.testing.assert_array_equal(first.tokens[:n0 + n1],
                                np.concatenate([samples[0].tokens[:n0], samples[1].tokens[:n1]]))
  np.testing.assert_array_equal(first.loss_mask[:n0 + n1],
                                np.concatenate([samples[0].loss_mask[:n0], samples[1].loss_mask[:n1]]))
  assert first.segment_ids.tolist() == [1] * n0 + [2] * n1 + [0] * 3
  assert first.positions.tolist() == list(range(n0)) + list(range(n1)) + [0] * 3
  assert not first.loss_mask[n0 + n1:].any() and not first.tokens[n0 + n1:].any()
  # the model's mask built from these segment ids: causal inside a segment, nothing across, padding sees none
  seg = jnp.asarray(first.segment_ids)[None]
  pos = jnp.arange(row_len)[None]
  mask = np.asarray(attention_mask(pos, pos, q_segments=seg, kv_segments=seg))[0]
  assert mask[n0, n0] and mask[n0 + 1, n0] and not mask[n0, n0 - 1] and mask[n0 - 1, 0]
  assert not mask[n0 + n1:].any()
  with pytest.raises(SphinxError, match="does not fit a packed row of 10"):
    conv.pack(samples, 10)
