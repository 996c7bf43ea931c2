"""Random re-initialisation of tiny HF decoders for parity tests: norm weights away from 1, embeddings of unit
scale, every other matrix (the MoE router too) scaled by fan-in, so no block is near-identity and top-k routing
is decisive."""
import torch


def randomize_decoder_(model):
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.uniform_(0.5, 1.5)
      elif "embed_tokens" in name:
        p.normal_(0.0, 1.0)
      else:
        p.normal_(0.0, p.shape[1] ** -0.5)
  return model
