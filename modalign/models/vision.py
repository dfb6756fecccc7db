"""Vision encoder: one ViT for CLIP and SigLIP towers, chosen by ``VisionConfig`` flags.

Parameter names follow transformers' ``CLIPVisionModel``/``SiglipVisionModel`` (minus the
``vision_model.`` prefix), so loaders are key maps:

    pixels [N,3,S,S] -> patch conv -> (+cls) + pos -> (pre-LN) -> L blocks -> (post-LN)
    hidden_states = (after pre-LN embeddings, layer_1, ..., layer_L)
    features = hidden_states[feature_layer] (drop cls for "patch") [N, L_in, D_vis]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from modalign.config import VisionConfig
from modalign.models.layers import activation


def resize_position_table(table: torch.Tensor, grid: int, class_token: bool = True) -> torch.Tensor:
    """[c + g0^2, C] -> [c + grid^2, C] (c = 1 with a class token): the patch rows resized
    bicubically (align_corners=False), as towers reused at another resolution are."""
    c = int(class_token)
    g0 = math.isqrt(table.shape[0] - c)
    if g0 * g0 != table.shape[0] - c:
        raise ValueError(
            f"a position table of {table.shape[0]} rows is not a square grid (class token: {class_token})"
        )
    if g0 == grid:
        return table
    patches = table[c:].reshape(1, g0, g0, -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(table.dtype)
    return torch.cat([table[:c], patches])


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, d, cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias
        )
        if cfg.class_token:
            self.class_embedding = nn.Parameter(torch.zeros(d))
        self.position_embedding = nn.Embedding(cfg.num_positions, d)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        n, _, h, w = pixel_values.shape
        s = self.cfg.image_size
        if h != s or w != s:
            raise ValueError(f"pixel_values are {h}x{w}, the vision tower expects {s}x{s}")
        w_dtype = self.patch_embedding.weight.dtype
        x = self.patch_embedding(pixel_values.to(w_dtype)).flatten(2).transpose(1, 2)  # [N,P,D]
        if self.cfg.class_token:
            x = torch.cat([self.class_embedding.expand(n, 1, -1).to(x.dtype), x], dim=1)
        return x + self.position_embedding.weight.to(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        b, n, d = x_BLD.shape
        h = self.num_heads

        def heads(t):
            return t.view(b, n, h, d // h).transpose(1, 2)

        q, k, v = heads(self.q_proj(x_BLD)), heads(self.k_proj(x_BLD)), heads(self.v_proj(x_BLD))
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(o.transpose(1, 2).reshape(b, n, d))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoderLayers(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_layers))


class VisionTower(nn.Module):
    """CLIP/SigLIP ViT. ``forward(pixels)`` returns the connector's input features."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        if cfg.pre_layernorm:
            self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = VisionEncoderLayers(cfg)
        if cfg.post_layernorm:
            self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.gradient_checkpointing = False
        if cfg.hd_layout == "ixc":
            c4 = 4 * cfg.hidden_size
            self.glb_GN = nn.Parameter(torch.zeros(1, 1, c4))  # separator after the global view
            self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, c4))  # row-end ("newline") token
        elif cfg.hd_layout is not None:
            raise ValueError(f"unknown hd_layout {cfg.hd_layout!r}; known: ixc")

    def _layer_indices(self) -> list[int]:
        n = self.cfg.num_layers + 1
        layers = self.cfg.feature_layer
        idx = [layers] if isinstance(layers, int) else list(layers)
        out = []
        for i in idx:
            if not -n <= i < n:
                raise ValueError(f"feature_layer {i} out of range for {n - 1} layers")
            out.append(i % n)
        return out

    def hidden_states(self, pixel_values: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """All hidden states up to index ``upto`` (inclusive; default: all).
        Index 0 is the embeddings after pre-LN, index i the output of block i."""
        x = self.embeddings(pixel_values)
        if self.cfg.pre_layernorm:
            x = self.pre_layrnorm(x)
        states = [x]
        last = self.cfg.num_layers if upto is None else upto
        for layer in self.encoder.layers[:last]:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
            states.append(x)
        return states

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> features [N, L_in, feature_dim]."""
        idx = self._layer_indices()
        states = self.hidden_states(pixel_values, upto=max(idx))  # skip unused top layers
        feats = []
        for i in idx:
            h = states[i]
            if self.cfg.feature_post_norm and self.cfg.post_layernorm:
                h = self.post_layernorm(h)
            select = self.cfg.feature_select
            if select == "drop_first" or (select == "patch" and self.cfg.class_token):
                h = h[:, 1:]
            elif select not in ("patch", "full"):
                raise ValueError(f"unknown feature_select {select!r}; known: patch, full, drop_first")
            feats.append(h)
        return feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)

    # ------------------------------------------------------------ high-resolution layout (IXC)
    #   image [3, h*t, w*t] -> crops [global (resized to t x t), tile(0,0) ... tile(h-1,w-1)]
    #   each crop: n x n patches -> 2x2 merge -> (n/2) x (n/2) cells of width 4C
    #   tokens = global rows (+sub_GN each) | glb_GN | big tile grid rows (+sub_GN each)

    def hd_num_tokens(self, h: int, w: int) -> int:
        half = self.cfg.grid // 2
        return (h * w + 1) * half * half + 1 + half * (h + 1)

    def encode_hd(self, image: torch.Tensor) -> torch.Tensor:
        """One image [3, h*t, w*t] -> tokens [L, 4C] in the IXC-2.5 layout."""
        t = self.cfg.image_size
        _, height, width = image.shape
        if height % t or width % t:
            raise ValueError(
                f"HD image is {height}x{width}; both sides must be multiples of the tile size {t}"
            )
        h, w = height // t, width // t
        x = image[None]
        glb = x if h == w == 1 else F.interpolate(x, size=(t, t), mode="bicubic", align_corners=False)
        tiles = x.view(1, 3, h, t, w, t).permute(0, 2, 4, 1, 3, 5).reshape(h * w, 3, t, t)
        feats = self(torch.cat([glb, tiles]))  # [1 + h*w, n*n, C]
        n, c = self.cfg.grid, feats.shape[-1]
        half = n // 2
        cells = feats.view(-1, half, 2, half, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, half, half, 4 * c)
        sub = self.sub_GN.to(cells.dtype).view(1, 1, 4 * c)
        g = torch.cat([cells[0], sub.expand(half, 1, -1)], dim=1).reshape(-1, 4 * c)
        big = (
            cells[1:].view(h, w, half, half, 4 * c).permute(0, 2, 1, 3, 4).reshape(h * half, w * half, 4 * c)
        )
        s = torch.cat([big, sub.expand(h * half, 1, -1)], dim=1).reshape(-1, 4 * c)
        return torch.cat([g, self.glb_GN.to(cells.dtype).view(1, 4 * c), s])
