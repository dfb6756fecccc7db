"""Helpers for the server tests: a tiny chat model, images (and a header bomb), a server on a
free loopback port."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import torch
from PIL import Image

from modalign import MLLM, MLLMConfig
from modalign.data.tokenizer import Tokenizer
from modalign.infer.chat import ChatModel
from modalign.serve.server import serve_in_thread

KEY = "sk-test"


def tiny_chat_model(
    context: int = 128, placeholder: str | None = None, resize_mode: str = "squash"
) -> ChatModel:
    torch.manual_seed(0)
    cfg = MLLMConfig.from_name("tiny-shapes")
    cfg.llm.num_layers = cfg.vision.num_layers = 2
    cfg.llm.max_position_embeddings = context
    cfg.vision.resize_mode = resize_mode
    if placeholder is not None:
        cfg.placeholder = placeholder
    model = MLLM(cfg).eval()
    tok = Tokenizer.train_bpe(
        ["what colour is the shape in the picture red blue green yes no"] * 50, vocab_size=300
    )
    tok.template_name = "chatml"
    return ChatModel(model, tok)


def png_data_url(color=(200, 30, 30), size=(40, 40)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def header_png(w: int, h: int) -> bytes:
    """A tiny PNG whose header declares ``w`` x ``h`` (a decompression bomb's header)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    raw = bytearray(buf.getvalue())
    raw[16:24] = struct.pack(">II", w, h)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    return bytes(raw)


def bomb_data_url(w: int = 30000, h: int = 30000) -> str:
    return "data:image/png;base64," + base64.b64encode(header_png(w, h)).decode()


def start(app, **kw):
    """Serve ``app`` on a free loopback port in a thread (the CLI's server); returns (url, stop)."""
    return serve_in_thread(app, **kw)
