"""``modalign`` command line: quickstart, train, chat, generate, serve, eval, convert, data."""

from __future__ import annotations

import argparse
import sys


def _convert(args) -> int:
    from modalign import MLLM
    from modalign.checkpoints import export_hf_llava

    model = MLLM.from_pretrained(args.src)
    if args.to == "native":
        model.save_pretrained(args.dst)
    else:
        export_hf_llava(model, args.dst)
    print(f"wrote {args.to} checkpoint to {args.dst}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modalign", description="Modular multimodal LLMs.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a checkpoint between formats")
    c.add_argument("src", help="checkpoint directory (native, transformers LLaVA/Llama/Mistral/Qwen2)")
    c.add_argument("dst", help="output directory")
    c.add_argument("--to", choices=["native", "hf-llava"], default="native")
    c.set_defaults(func=_convert)

    q = sub.add_parser("quickstart", help="train a miniature multimodal LLM end to end on CPU")
    q.add_argument("--out", default="runs/quickstart")
    q.set_defaults(func=_not_yet)
    return p


def _not_yet(args) -> int:
    print(f"modalign {args.command}: not yet available in this version")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"modalign {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())


def main_entry() -> None:
    sys.exit(main())
