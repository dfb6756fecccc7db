"""Inference: the generation engine (``engine.py``), the fused decode step (``fast_decode.py``)
and chat sessions over them (``chat.py``)."""
