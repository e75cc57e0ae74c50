"""The same M6 architecture and train step in PyTorch, as a speed reference (benchmarks only).

Layer for layer what m6_jax/model builds with the linear patch stem: patch projection + row /
column embeddings, token + 1-D text position + segment embeddings, pre-LN blocks (query and
value projections with bias, key without, output projection with bias; GELU (tanh) MLP), a
final LayerNorm, a tied LM head on the target positions, token cross-entropy weighted by
`tgt_weights`, global-norm clipping and AdamW. Written the way a PyTorch user would: nn
modules and `scaled_dot_product_attention` with a boolean prefix-LM mask. The benchmark
turns on `torch.set_flush_denormal(True)` first: XLA:CPU flushes denormals, and without it
PyTorch's step can slow down several-fold once tiny values appear (CPU-dependent).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
  def __init__(self, d_model: int, num_heads: int, head_dim: int, mlp_dim: int):
    super().__init__()
    inner = num_heads * head_dim
    self.num_heads, self.head_dim = num_heads, head_dim
    self.norm1 = nn.LayerNorm(d_model, eps=1e-6)
    self.query = nn.Linear(d_model, inner)
    self.key = nn.Linear(d_model, inner, bias=False)
    self.value = nn.Linear(d_model, inner)
    self.out = nn.Linear(inner, d_model)
    self.norm2 = nn.LayerNorm(d_model, eps=1e-6)
    self.wi = nn.Linear(d_model, mlp_dim)
    self.wo = nn.Linear(mlp_dim, d_model)

  def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    b, length, _ = x.shape
    h = self.norm1(x)

    def heads(t):
      return t.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)

    q, k, v = heads(self.query(h)), heads(self.key(h)), heads(self.value(h))
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
    x = x + self.out(a.transpose(1, 2).reshape(b, length, -1))
    return x + self.wo(F.gelu(self.wi(self.norm2(x)), approximate="tanh"))


class TorchM6(nn.Module):
  def __init__(self, c):
    """`c` is an M6Config (m6_jax.model.m6)."""
    super().__init__()
    self.c = c
    grid = c.image_size // c.patch_size
    self.patch = nn.Linear(c.patch_size * c.patch_size * 3, c.d_model)
    self.row = nn.Parameter(torch.randn(grid, c.d_model) * 0.02)
    self.col = nn.Parameter(torch.randn(grid, c.d_model) * 0.02)
    self.tokens = nn.Embedding(c.vocab_size, c.d_model)
    self.text_pos = nn.Embedding(c.src_len + c.tgt_len, c.d_model)
    self.segment = nn.Embedding(3, c.d_model)
    self.blocks = nn.ModuleList(
      [Block(c.d_model, c.num_heads, c.head_dim, c.mlp_dim) for _ in range(c.num_layers)]
    )
    self.final_norm = nn.LayerNorm(c.d_model, eps=1e-6)
    p = c.num_patches
    segments = torch.cat(
      [
        torch.zeros(p, dtype=torch.long),
        torch.ones(c.src_len, dtype=torch.long),
        torch.full((c.tgt_len,), 2, dtype=torch.long),
      ]
    )
    self.register_buffer("segments", segments, persistent=False)
    idx = torch.arange(p + c.src_len + c.tgt_len)
    is_prefix = idx < p + c.src_len
    structure = is_prefix[None, :] | (~is_prefix[:, None] & (idx[None, :] <= idx[:, None]))
    self.register_buffer("structure", structure, persistent=False)

  def patchify(self, images: torch.Tensor) -> torch.Tensor:
    b, h, w, ch = images.shape
    ps = self.c.patch_size
    x = images.reshape(b, h // ps, ps, w // ps, ps, ch).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // ps) * (w // ps), ps * ps * ch)

  def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    c = self.c
    image_x = self.patch(self.patchify(batch["image"]))
    image_x = image_x + (self.row[:, None] + self.col[None, :]).reshape(-1, c.d_model)
    text = torch.cat([batch["src_tokens"], batch["tgt_input"]], dim=1)
    text_x = self.tokens(text) + self.text_pos.weight[None]
    x = torch.cat([image_x, text_x], dim=1) + self.segment(self.segments)[None]
    b = x.shape[0]
    image_valid = batch["has_image"].bool()[:, None].expand(b, c.num_patches)
    valid = torch.cat([image_valid, batch["src_tokens"] != 0, batch["tgt_input"] != 0], dim=1)
    mask = self.structure[None] & valid[:, None, :]
    for block in self.blocks:
      x = block(x, mask)
    x = self.final_norm(x[:, -c.tgt_len :])
    return x @ self.tokens.weight.T


def make_train_step(model: TorchM6, lr: float, weight_decay: float, clip: float):
  opt = torch.optim.AdamW(
    model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=weight_decay
  )

  def step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(batch)
    losses = F.cross_entropy(logits.transpose(1, 2), batch["tgt_target"], reduction="none")
    weights = batch["tgt_weights"]
    loss = (losses * weights).sum() / weights.sum().clamp(min=1.0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return loss

  return step
