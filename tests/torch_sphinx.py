"""A PyTorch SPHINX composed from the real reference towers, shared by the parity tests and the benchmarks.

Reference: open_clip 2.24 CLIP (run as SPHINX's `clip_encode_image`), timm `convnext_xxlarge` trimmed as SPHINX
trims it, the PyPI `dinov2` DinoVisionTransformer, transformers 4.57 `Blip2Model` (`get_qformer_features`), and a
LLaMA written below from SPHINX.md §2.1 (interleaved complex RoPE, fp32 RMSNorm, causal over everything). The
image path of each variant file (`encode_image` of llama_ens.py, llama_ens5.py, llama_ens_light.py) is restated
with torch's own `F.interpolate` in fp16. `TorchSphinx(model_config)` takes the `model` section of one of our
configs; `randomise` makes every weight random; `accessory_dir` writes the LLaMA2-Accessory checkpoint directory.
Shapes: images float[B, 3, S, S] (NCHW, CLIP-normalised), tokens int[B, T], logits float[B, T, vocab].
"""
import json
import math

import numpy as np
import open_clip
import timm
import torch
import torch.nn.functional as F
import transformers
from dinov2.models.vision_transformer import DinoVisionTransformer
from PIL import Image
from skimage import data as skdata

from sphinx_jax.config import ffn_hidden_dim, patch_grid
from sphinx_jax.data import image as image_data

CLIP_MEAN = torch.tensor(image_data.CLIP_MEAN).view(3, 1, 1)
CLIP_STD = torch.tensor(image_data.CLIP_STD).view(3, 1, 1)
DINO_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
DINO_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


# ------------------------------------------------------------------------------------------ torch pieces
@torch.no_grad()
def randomise(module, seed):
  """Every parameter random: token embeddings N(0, 1); norm weights 1 + N(0, 0.2) and biases N(0, 0.2); matrices
  and kernels N(0, 1/fan_in); everything else (biases, LayerScale gammas, class/position/query tokens, image
  tags) N(0, 0.5)."""
  gen = torch.Generator().manual_seed(seed)
  owners = dict(module.named_modules())
  for name, p in module.named_parameters():
    noise = torch.randn(p.shape, generator=gen)
    owner = owners[name.rpartition(".")[0]]
    if isinstance(owner, torch.nn.Embedding):  # token embeddings as large as the image tokens beside them
      p.copy_(noise)
    elif isinstance(owner, (torch.nn.LayerNorm, RMSNorm)):
      p.copy_(1.0 + 0.2 * noise if name.endswith("weight") else 0.2 * noise)
    elif p.ndim >= 2 and name.endswith("weight"):
      p.copy_(noise / math.sqrt(p[0].numel()))
    else:
      p.copy_(0.5 * noise)


def rms_norm(x, weight, eps):
  x32 = x.float()
  return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


class RMSNorm(torch.nn.Module):
  def __init__(self, dim, eps):
    super().__init__()
    self.eps, self.weight = eps, torch.nn.Parameter(torch.ones(dim))

  def forward(self, x):
    return rms_norm(x, self.weight, self.eps)


def rope(x, positions, theta):
  """Meta's complex RoPE: x [B, L, N, H], pairs (2i, 2i+1) times exp(i * t * theta^(-2i/H))."""
  h = x.shape[-1]
  freqs = 1.0 / (theta ** (torch.arange(0, h, 2)[: h // 2].float() / h))
  cis = torch.polar(torch.ones(len(positions), h // 2), torch.outer(positions.float(), freqs))
  xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
  return torch.view_as_real(xc * cis[None, :, None, :]).flatten(3).type_as(x)


class Attention(torch.nn.Module):
  def __init__(self, llm):
    super().__init__()
    self.n, self.k, self.h, self.theta = llm.n_heads, llm.n_kv_heads, llm.dim // llm.n_heads, llm.rope_theta
    self.wq = torch.nn.Linear(llm.dim, self.n * self.h, bias=False)
    self.wk = torch.nn.Linear(llm.dim, self.k * self.h, bias=False)
    self.wv = torch.nn.Linear(llm.dim, self.k * self.h, bias=False)
    self.wo = torch.nn.Linear(self.n * self.h, llm.dim, bias=False)

  def forward(self, x, cache=None):
    """x [B, L, D] at positions start..start+L-1; `cache` None (start 0) or this layer's {"k", "v"} of the
    positions before (empty dict at first), extended in place, as the original's `forward_inference`."""
    b, length, _ = x.shape
    start = cache["k"].shape[1] if cache else 0
    positions = torch.arange(start, start + length)
    q = rope(self.wq(x).view(b, length, self.n, self.h), positions, self.theta)
    k = rope(self.wk(x).view(b, length, self.k, self.h), positions, self.theta)
    v = self.wv(x).view(b, length, self.k, self.h)
    if cache is not None:
      if cache:
        k, v = torch.cat([cache["k"], k], dim=1), torch.cat([cache["v"], v], dim=1)
      cache["k"], cache["v"] = k, v
    k, v = (t.repeat_interleave(self.n // self.k, dim=2) for t in (k, v))  # KV head j serves j*rep..
    scores = torch.einsum("bqnh,bknh->bnqk", q, k) / math.sqrt(self.h)
    causal = torch.ones(length, start + length, dtype=torch.bool).triu(start + 1)
    scores = scores.masked_fill(causal, float("-inf"))
    out = torch.einsum("bnqk,bknh->bqnh", scores.float().softmax(-1).type_as(q), v)
    return self.wo(out.reshape(b, length, -1))


class FeedForward(torch.nn.Module):
  def __init__(self, llm):
    super().__init__()
    hidden = ffn_hidden_dim(llm)
    self.w1 = torch.nn.Linear(llm.dim, hidden, bias=False)
    self.w2 = torch.nn.Linear(hidden, llm.dim, bias=False)
    self.w3 = torch.nn.Linear(llm.dim, hidden, bias=False)

  def forward(self, x):
    return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Layer(torch.nn.Module):
  def __init__(self, llm):
    super().__init__()
    self.attention, self.feed_forward = Attention(llm), FeedForward(llm)
    self.attention_norm, self.ffn_norm = RMSNorm(llm.dim, llm.norm_eps), RMSNorm(llm.dim, llm.norm_eps)

  def forward(self, x, cache=None):
    h = x + self.attention(self.attention_norm(x), cache)
    return h + self.feed_forward(self.ffn_norm(h))


def tiny_clip(c):
  clip = open_clip.model.CLIP(
      embed_dim=c.embed_dim, quick_gelu=c.act == "quick_gelu",
      vision_cfg=dict(image_size=c.image_size, layers=c.layers, width=c.width, patch_size=c.patch,
                      head_width=c.width // c.heads, mlp_ratio=c.mlp_dim / c.width),
      text_cfg=dict(context_length=c.text.context, vocab_size=c.text.vocab, width=c.text.width, heads=2, layers=1))
  clip.transformer = None  # SPHINX deletes the text transformer and keeps the other text leaves
  return clip


def clip_encode_image(clip, x):
  """SPHINX's `clip_encode_image`: all 257 tokens after ln_post, no proj (open_clip 2.24 is sequence-first)."""
  visual = clip.visual
  x = visual.conv1(x)
  x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
  cls = visual.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
  x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype))
  x = visual.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
  return visual.ln_post(x)


def tiny_convnext(c):
  trunk = timm.create_model("convnext_xxlarge", pretrained=False, depths=tuple(c.depths), dims=tuple(c.dims))
  trunk.reset_classifier(0)  # open_clip (timm_pool "") keeps the norm head with fc = Identity
  trunk.head.global_pool, trunk.head.flatten = torch.nn.Identity(), torch.nn.Identity()  # SPHINX's trim
  return trunk


def tiny_dinov2(c):
  return DinoVisionTransformer(img_size=c.pos_grid * c.patch, patch_size=c.patch, embed_dim=c.width, depth=c.depth,
                               num_heads=c.heads, mlp_ratio=1.5 * c.mlp_hidden / c.width, ffn_layer="swiglufused",
                               init_values=1.0, block_chunks=0)


def tiny_blip2(c):
  v, q = c.vision, c.qformer
  config = transformers.Blip2Config(
      vision_config=dict(hidden_size=v.width, num_hidden_layers=v.layers, num_attention_heads=v.heads,
                         intermediate_size=v.mlp_dim, image_size=v.image_size, patch_size=v.patch,
                         layer_norm_eps=v.eps, qkv_bias=True),
      qformer_config=dict(hidden_size=q.hidden, num_hidden_layers=q.layers, num_attention_heads=q.heads,
                          intermediate_size=q.intermediate, encoder_hidden_size=v.width,
                          cross_attention_frequency=q.cross_attention_frequency, layer_norm_eps=q.eps),
      text_config=dict(model_type="opt", vocab_size=64, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, ffn_dim=32, word_embed_proj_dim=16),
      num_query_tokens=c.num_query_tokens)
  model = transformers.Blip2Model(config)
  model.language_model, model.language_projection = None, None  # SPHINX keeps vision + Q-Former only
  return model


def projection(width, dim):
  return torch.nn.Sequential(torch.nn.Linear(width, dim), torch.nn.LayerNorm(dim))


class TorchSphinx(torch.nn.Module):
  """The llama_ens* `Transformer`; attribute names give the accessory keys (minus `llma.`)."""

  def __init__(self, model):
    super().__init__()
    llm, self.model = model.llm, model
    self.tok_embeddings = torch.nn.Embedding(llm.vocab_size, llm.dim)
    self.layers = torch.nn.ModuleList(Layer(llm) for _ in range(llm.n_layers))
    self.norm = RMSNorm(llm.dim, llm.norm_eps)
    self.output = torch.nn.Linear(llm.dim, llm.vocab_size, bias=False)
    channels = 0
    if "qformer" in model.towers:
      self.qformer = tiny_blip2(model.qformer)
      self.qformer_proj = projection(model.qformer.qformer.hidden, llm.dim)
    if "clip" in model.towers:
      self.clip, channels = tiny_clip(model.clip), channels + model.clip.width
    self.openclip_convnext_xxl = tiny_convnext(model.convnext)
    self.dinov2_vitg14 = tiny_dinov2(model.dinov2)
    channels += model.convnext.dims[-1] + model.dinov2.width
    self.visual_proj = projection(channels, llm.dim)
    self.start_img = torch.nn.Parameter(torch.rand(1, 1, llm.dim))
    self.end_img = torch.nn.Parameter(torch.rand(1, 1, llm.dim))

  def views(self, image):
    """(224-px views, ConvNeXt inputs), each a list over views, as the variant's `encode_image` builds them."""
    m, side = self.model, image.shape[-1]
    if m.views == 1 and side == 224:  # llama_ens
      return [image], [F.interpolate(image.half(), size=(256, 256)).to(image)]
    if m.views == 1:  # llama_ens_light / mixtral_sparse_ens at 512
      return ([F.interpolate(image.half(), size=(224, 224), mode="bicubic").to(image)],
              [F.interpolate(image.half(), size=(512, 512)).to(image)])
    assert side == 448  # llama_ens5
    small = [F.interpolate(image.half(), size=(224, 224), mode="bicubic").to(image),
             image[..., :224, :224], image[..., :224, 224:], image[..., 224:, :224], image[..., 224:, 224:]]
    return small, [F.interpolate(v.half(), size=(256, 256)).to(v) for v in small]

  def encode_view(self, small, large):
    m = self.model
    streams = []
    if "clip" in m.towers:
      streams.append(clip_encode_image(self.clip, small))
    conv = self.openclip_convnext_xxl(large)
    rep = patch_grid(m) // conv.shape[-1]
    if rep > 1:  # 224 views: 8x8 -> 16x16 by 2x2 duplication (the original); the demo's patch-28 grid is 8x8 already
      conv = conv.repeat_interleave(rep, dim=-1).repeat_interleave(rep, dim=-2)
    conv = conv.flatten(-2).permute(0, 2, 1)
    streams.append(torch.cat([conv.mean(dim=1, keepdim=True), conv], dim=1))
    if "qformer" in m.towers:
      dino_in = (small * CLIP_STD + CLIP_MEAN - DINO_MEAN) / DINO_STD
    else:  # llama_ens_light writes it this way
      dino_in = small * (CLIP_STD / DINO_STD) + (CLIP_MEAN - DINO_MEAN) / DINO_STD
    dino = self.dinov2_vitg14.forward_features(dino_in)
    streams.append(torch.cat([dino["x_norm_clstoken"][:, None], dino["x_norm_patchtokens"]], dim=1))
    tokens = self.visual_proj(torch.cat(streams, dim=2))
    if "qformer" in m.towers:
      queries = self.qformer.get_qformer_features(pixel_values=small).last_hidden_state
      tokens = torch.cat([self.qformer_proj(queries), tokens], dim=1)
    b = tokens.shape[0]
    return torch.cat([self.start_img.expand(b, -1, -1), tokens, self.end_img.expand(b, -1, -1)], dim=1)

  def encode_image(self, image):
    return torch.cat([self.encode_view(s, l) for s, l in zip(*self.views(image))], dim=1)

  def forward(self, tokens, image_tokens=None, cache=None):
    """Logits from `image_words` on (the original's `forward`); image_tokens from `encode_image`.

    `cache` (one dict per layer, empty at first; see `greedy`) keeps keys and values for later calls, which
    then pass only the new tokens and no image."""
    h = self.tok_embeddings(tokens)
    words = 0
    if image_tokens is not None:
      h = torch.cat([h[:, :1], image_tokens, h[:, 1:]], dim=1)
      words = image_tokens.shape[1]
    for i, layer in enumerate(self.layers):
      h = layer(h, None if cache is None else cache[i])
    return self.output(self.norm(h)[:, words:])

  def greedy(self, tokens, image_tokens, new_tokens):
    """KV-cached greedy decoding (the original's `generate` at temperature 0, without stop rules): prefill of
    image block + prompts tokens int[B, T], then one token per step. Returns int[B, new_tokens]."""
    cache = [{} for _ in self.layers]
    token = self(tokens, image_tokens, cache)[:, -1].argmax(-1)
    out = [token]
    for _ in range(new_tokens - 1):
      token = self(token[:, None], cache=cache)[:, -1].argmax(-1)
      out.append(token)
    return torch.stack(out, dim=1)


# ------------------------------------------------------------------------------------------ checkpoint and inputs
def accessory_dir(torch_model, model, tmp_path, tokenizer):
  """consolidated.00-of-01.model.pth + config.json + meta.json + tokenizer.model, fp32 for parity."""
  state = {f"llma.{k}": v.contiguous() for k, v in torch_model.state_dict().items()}
  torch.save(state, tmp_path / "consolidated.00-of-01.model.pth")
  llm = model.llm
  args = dict(dim=llm.dim, n_layers=llm.n_layers, n_heads=llm.n_heads,
              n_kv_heads=None if llm.n_kv_heads == llm.n_heads else llm.n_kv_heads, vocab_size=-1,
              multiple_of=llm.multiple_of, ffn_dim_multiplier=None, norm_eps=llm.norm_eps, rope_theta=10000,
              max_batch_size=32, max_seq_len=4096, rope_scaling=None, load_pretrained_visual_encoder=False)
  if model.llama_type.endswith("light"):
    args["trainable_mode"] = "mm_stage2"
  (tmp_path / "config.json").write_text(json.dumps(args))
  (tmp_path / "meta.json").write_text(json.dumps({"llama_type": model.llama_type}))
  (tmp_path / "tokenizer.model").write_bytes(tokenizer.read_bytes())
  return tmp_path


def photo(size):
  """skimage's astronaut, padded-resized and CLIP-normalised: float32[1, size, size, 3]."""
  pixels = image_data.padded_resize(Image.fromarray(skdata.astronaut()).crop((0, 40, 512, 400)), size)
  return np.asarray(image_data.normalize(pixels))[None]


def torch_image(image):
  return torch.from_numpy(np.array(image)).permute(0, 3, 1, 2).contiguous()
