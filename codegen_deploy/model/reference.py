"""CodeGen in plain PyTorch, numerically equal to Hugging Face's CodeGenForCausalLM.

Built bottom-up: rotary embedding, attention, MLP, block, model. The float32 islands that CodeGen
needs in half precision (LayerNorm, attention scores and softmax, rotary) are explicit, so an
fp16 trace of this model is already a correct mixed-precision graph.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig

KVCache = tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per layer (key, value), each [B, H, total, D]


def rotary_tables(n_positions: int, rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sin and cos tables, each [n_positions, rotary_dim // 2], float32 (as GPT-J / CodeGen compute them)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64) / rotary_dim))
    angles = torch.arange(n_positions, dtype=torch.int64).float()[:, None] * inv_freq  # [P, R/2]
    return torch.sin(angles), torch.cos(angles)


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): GPT-J's interleaved rotation."""
    pairs = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1)  # [..., R/2, 2]
    return pairs.flatten(-2)  # [..., R]


def apply_rotary(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Rotate the first rotary_dim dims of each head of x [B, T, H, D] in float32; sin/cos are [B, T, R/2]."""
    sin = sin.repeat_interleave(2, dim=-1)[:, :, None, :]  # [B, T, 1, R]
    cos = cos.repeat_interleave(2, dim=-1)[:, :, None, :]  # [B, T, 1, R]
    x_rot, x_pass = x[..., :rotary_dim].float(), x[..., rotary_dim:]
    x_rot = x_rot * cos + rotate_every_two(x_rot) * sin
    return torch.cat((x_rot.to(x.dtype), x_pass), dim=-1)


def layer_norm_fp32(ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm computed in float32: in fp16 its variance overflows on the large models."""
    out = F.layer_norm(x.float(), ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps)
    return out.to(x.dtype)


def attention_bias(attention_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Additive float32 bias [B, 1, T, total]: 0 where a query may attend, float32 min where not.

    Combines causality (the T new tokens sit at the end of the total) with padding (mask 0).
    """
    total = attention_mask.shape[1]
    key_pos = torch.arange(total, device=attention_mask.device)
    query_pos = key_pos[total - seq_len :]
    causal = key_pos[None, :] <= query_pos[:, None]  # [T, total]
    allowed = causal[None, None, :, :] & attention_mask[:, None, None, :].bool()  # [B, 1, T, total]
    zero = torch.zeros((), dtype=torch.float32, device=attention_mask.device)
    return torch.where(allowed, zero, torch.finfo(torch.float32).min)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        e = config.n_embd
        self.n_head, self.head_dim, self.rotary_dim = config.n_head, config.head_dim, config.rotary_dim
        self.q_proj = nn.Linear(e, e, bias=False)
        self.k_proj = nn.Linear(e, e, bias=False)
        self.v_proj = nn.Linear(e, e, bias=False)
        self.out_proj = nn.Linear(e, e, bias=False)

    def project(self, x, sin, cos):
        """q, k, v of x [B, T, E], each [B, H, T, D], with rotary applied to q and k."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_head, self.head_dim)  # [B, T, H, D]
        k = self.k_proj(x).view(b, t, self.n_head, self.head_dim)  # [B, T, H, D]
        v = self.v_proj(x).view(b, t, self.n_head, self.head_dim)  # [B, T, H, D]
        q = apply_rotary(q, sin, cos, self.rotary_dim).transpose(1, 2)  # [B, H, T, D]
        k = apply_rotary(k, sin, cos, self.rotary_dim).transpose(1, 2)  # [B, H, T, D]
        return q, k, v.transpose(1, 2)

    def attend(self, q, keys, values, bias):
        """Attention of q [B, H, T, D] over keys/values [B, H, total, D]; the output projection [B, T, E]."""
        b, _, t, _ = q.shape
        # CodeGen's order: mask added to the raw float32 scores, then divided by sqrt(head_dim).
        scores = torch.matmul(q.float(), keys.float().transpose(-1, -2))  # [B, H, T, total]
        scores = (scores + bias) / math.sqrt(self.head_dim)
        probs = torch.softmax(scores, dim=-1).to(values.dtype)
        y = torch.matmul(probs, values)  # [B, H, T, D]
        y = y.transpose(1, 2).reshape(b, t, -1)  # [B, T, E]
        return self.out_proj(y)

    def forward(self, x, sin, cos, bias, past: tuple[torch.Tensor, torch.Tensor] | None):
        q, k, v = self.project(x, sin, cos)
        if past is not None:
            k = torch.cat((past[0], k), dim=2)  # [B, H, total, D]
            v = torch.cat((past[1], v), dim=2)  # [B, H, total, D]
        return self.attend(q, k, v, bias), (k, v)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.n_embd, config.n_inner)
        self.fc_out = nn.Linear(config.n_inner, config.n_embd)
        self.activation = config.activation

    def forward(self, x):
        h = self.fc_in(x)
        if self.activation == "gelu_new":
            h = F.gelu(h, approximate="tanh")
        elif self.activation == "gelu":
            h = F.gelu(h)
        else:
            h = F.relu(h)
        return self.fc_out(h)


class Block(nn.Module):
    """One ln_1 feeds attention and MLP in parallel: x + attn(ln_1 x) + mlp(ln_1 x)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config)
        self.mlp = MLP(config)

    def forward(self, x, sin, cos, bias, past):
        h = layer_norm_fp32(self.ln_1, x)
        attn_out, present = self.attn(h, sin, cos, bias, past)
        return x + attn_out + self.mlp(h), present


class CodeGen(nn.Module):
    """CodeGen causal LM. `forward` returns (float32 logits [B, T, vocab], present cache per layer)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size)
        self.reset_rotary()

    def reset_rotary(self) -> None:
        """(Re)compute the sin/cos tables on the model's device; needed after building on the meta device."""
        device = self.wte.weight.device
        device = torch.device("cpu") if device.type == "meta" else device
        with torch.device(device):  # overrides an enclosing `with torch.device("meta")`
            sin, cos = rotary_tables(self.config.n_positions, self.config.rotary_dim)
        self.register_buffer("rotary_sin", sin, persistent=False)
        self.register_buffer("rotary_cos", cos, persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.weight.dtype

    @classmethod
    def random(
        cls, config: ModelConfig, dtype: torch.dtype = torch.float32, seed: int = 0, std: float = 0.02
    ) -> CodeGen:
        """A model with random weights: normal(0, std) matrices, zero biases, unit LayerNorms.

        Each tensor is made directly in `dtype`, so a large shape never exists in float32.
        """
        generator = torch.Generator().manual_seed(seed)
        with torch.device("meta"):
            model = cls(config)
        for name, p in list(model.named_parameters()):
            t = torch.empty(p.shape, dtype=dtype)
            if name.endswith("bias"):
                t.zero_()
            elif ".ln_" in name or name.startswith("ln_"):
                t.fill_(1.0)
            else:
                t.normal_(0.0, std, generator=generator)
            model.load_state_dict({name: t}, strict=False, assign=True)
        model.reset_rotary()
        return model.eval()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """Run T new tokens after an optional cache of `past` tokens.

        input_ids [B, T]; attention_mask [B, past + T] (1 = token, 0 = padding; default all ones);
        position_ids [B, T] (default: counted from the mask, so left padding gets real positions).
        """
        b, t = input_ids.shape
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if attention_mask is None:
            attention_mask = torch.ones(b, past_len + t, dtype=torch.int64, device=input_ids.device)
        if position_ids is None:
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, past_len:]  # [B, T]
        sin = self.rotary_sin[position_ids]  # [B, T, R/2]
        cos = self.rotary_cos[position_ids]  # [B, T, R/2]
        bias = attention_bias(attention_mask, t)  # [B, 1, T, total]

        x = self.wte(input_ids)  # [B, T, E]
        present = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, sin, cos, bias, None if past_key_values is None else past_key_values[i])
            present.append(kv)
        x = layer_norm_fp32(self.ln_f, x)
        logits = self.lm_head(x).float()  # [B, T, vocab]
        return logits, tuple(present)
