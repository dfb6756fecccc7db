"""``modalign`` command line: quickstart, train, chat, generate, serve, eval, convert, data."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _convert(args) -> int:
    """Any supported checkpoint (or training-run folder over --base) to modalign's native format or
    transformers' LLaVA format, with its tokenizer and the conversation format its release uses;
    a model's LoRA to a PEFT adapter (--to peft), or a PEFT adapter over --base to a model
    (--from peft). --merge folds the LoRA into the weights."""
    from modalign import MLLM
    from modalign.checkpoints import default_template, export_hf_llava
    from modalign.checkpoints.peft import export_peft, import_peft, merge_lora
    from modalign.data.tokenizer import Tokenizer

    if args.to == "peft" and (args.src_format == "peft" or args.merge):
        raise SystemExit("modalign convert: --to peft takes a model with LoRA (no --from peft, no --merge)")
    if args.src_format == "peft":
        if args.base is None:
            raise SystemExit(
                "modalign convert: --from peft needs --base (the model the adapter was trained on)"
            )
        model_dir = Path(args.base)
        model = MLLM.from_pretrained(model_dir, vision_tower=args.vision_tower)
        n = import_peft(model, args.src)
        print(f"loaded LoRA on {n} linears from {args.src}")
    else:
        model_dir = Path(args.src)
        model = MLLM.from_pretrained(args.src, base=args.base, vision_tower=args.vision_tower)
    reads = tuple(Path(p) for p in (args.src, args.base) if p)  # never replaced by the write
    if args.to == "peft":
        export_peft(model, args.dst, reads)
        print(f"wrote peft adapter to {args.dst}")
        return 0
    if args.merge:
        merge_lora(model)
    tok = None
    for tok_dir in reads:
        if any((tok_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
            tok = Tokenizer.from_dir(tok_dir)
            if tok.template_name is None and not tok.chat_template:
                tok.template_name = default_template(model_dir)
            break
    img = None
    if args.to != "native":
        if model.config.llm.lora is not None:
            raise SystemExit("modalign convert: transformers' LLaVA holds no LoRA: add --merge")
        img = model.config.image_token_id
        if tok is not None and (img is None or not 0 <= img < model.config.llm.vocab_size):
            # the placeholder becomes a token: "<image>", the tokenizer's next id
            img = tok.token_id("<image>")
            if img is None:
                img = tok.vocab_size
                if img > model.config.llm.vocab_size:
                    raise SystemExit(
                        f"the tokenizer has {img} tokens, more than the model's {model.config.llm.vocab_size}"
                    )
        if tok is not None and tok.token_id("<image>") is None and tok.add_special_token("<image>") != img:
            raise SystemExit("the tokenizer cannot give <image> the id the model holds for it")
        if tok is not None:
            tok.image_token = "<image>" if tok.token_id("<image>") == img else tok.image_token
    # the tokenizer's files, written with the weights in one atomic step (checked before any write)
    files: dict[str, bytes] = {}
    if tok is not None:
        import tempfile

        with tempfile.TemporaryDirectory() as staged:
            tok.save(staged)
            files = {f.name: f.read_bytes() for f in Path(staged).iterdir() if f.is_file()}
    if args.to == "native":
        from modalign.checkpoints.native import save_native

        save_native(model, args.dst, extra_files=files, keep_tokenizer=False, reads=reads)
    else:
        export_hf_llava(model, args.dst, None if tok is None else img, extra_files=files, reads=reads)
    print(f"wrote {args.to} checkpoint to {args.dst}")
    return 0


def _data_shapes(args) -> int:
    from modalign.shapesworld import data as shapes

    meta = shapes.generate(args.out, num_train=args.train, num_eval=args.eval, seed=args.seed,
                           image_size=args.image_size, num_text=args.text, image_placement=args.image_placement,
                           layout=args.layout, turns=args.turns, short_references=args.short_references)  # fmt: skip
    print(json.dumps(meta, indent=2))
    return 0


def _data_synthesize(args) -> int:
    from modalign.data.synthesize import synthesize
    from modalign.llm_client import LLMClient

    client = LLMClient.from_env(args.endpoint, args.model, args.api_key_env, timeout_s=args.timeout,
                                max_retries=args.retries)  # fmt: skip
    summary = synthesize(args.annotations, args.kind, client, args.out, args.concurrency, args.limit, args.prompts,
                         args.captions, progress=not args.no_progress)  # fmt: skip
    print(json.dumps(summary, indent=2))
    return 0


def _data_inspect(args) -> int:
    from modalign.data.conversation import get_template
    from modalign.data.datasets import load_samples
    from modalign.data.images import ImageProcessor
    from modalign.data.inspect import inspect_file
    from modalign.data.tokenizer import Tokenizer

    image_token_id, image_tokens, proc, takes_images = args.image_token_id, args.image_tokens, None, True
    if args.model:  # the model's own processing, as its training renders the file
        from modalign import MLLM

        model = MLLM.from_pretrained(args.model)
        tok = Tokenizer.from_dir(args.model)
        image_token_id, takes_images = model.config.image_token_id, model.has_vision
        if model.has_vision:  # without vision, samples with images are refused (image count mismatch)
            image_tokens = 1 if model.config.placeholder == "per_image" else model.num_image_tokens()
            proc = ImageProcessor(model.config.vision)
    elif args.tokenizer:
        tok = Tokenizer.from_dir(args.tokenizer)
    else:
        texts = []
        for s in load_samples(args.file):
            texts += [m.content for m in getattr(s, "messages", [])] + (
                [s.text] if hasattr(s, "text") else []
            )
        tok = Tokenizer.train_bpe(texts, vocab_size=2048)
        print("(no --model/--tokenizer: token counts use a byte-level BPE trained on this file)")
    if image_token_id is None:
        image_token_id = tok.token_id(tok.image_token) if tok.image_token else -200
    if proc is None and takes_images:
        from modalign.config import VisionConfig

        proc = ImageProcessor(VisionConfig(image_size=args.image_size))
    images = args.images or str(Path(args.file).parent)
    report, text = inspect_file(args.file, tok, get_template(args.template, tok), images, proc, image_token_id,
                                image_tokens, args.max_length, color=not args.no_color and sys.stdout.isatty())  # fmt: skip
    print(json.dumps(report, indent=2) if args.json else text)
    return 0


def _model_flags(p: argparse.ArgumentParser) -> None:
    """Where and how a model is loaded (generate, chat, serve, eval)."""
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | mps | auto (the best available)")
    p.add_argument(
        "--dtype", default="auto", help="float32 | bfloat16 | float16 | auto (bf16 on GPUs that support it)"
    )
    p.add_argument(
        "--base", default=None, help="the base LLM of a training-run folder (a LoRA or projector-only run)"
    )
    p.add_argument(
        "--vision-tower", default=None, help="the vision tower folder a checkpoint names but does not hold"
    )
    p.add_argument("--quantize", default="none", choices=["none", "int8", "int4"],  # infer.quant.QUANTIZE
                   help="int8: the LLM's matrices replaced by int8 ones (a quarter of the memory, about 2.4x "
                   "faster decoding on the CPU); int4: by 4-bit groupwise ones, CPU (docs/benchmarks.md)")  # fmt: skip


def _load_chat(args, compile: bool = False):
    from modalign.infer.chat import ChatModel

    return ChatModel.load(args.model, args.template, device=args.device, dtype=args.dtype, compile=compile,
                          base=args.base, vision_tower=args.vision_tower,
                          image_cache_mb=getattr(args, "image_cache_mb", 256),
                          quantize=getattr(args, "quantize", None),
                          prefix_cache_mb=getattr(args, "prefix_cache_mb", 0))  # fmt: skip


def _compile_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (a one-off compile per batch shape, then faster tokens)")  # fmt: skip


def _prefix_cache_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefix-cache-mb", type=float, default=1024,
                   help="keys and values of earlier turns and requests are kept up to this many MiB, and a "
                   "prompt that begins with one of them runs only what follows (0: off)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modalign", description="Modular multimodal LLMs.")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_convert, _add_data, _add_generate, _add_chat, _add_serve, _add_eval, _add_train,
                _add_quickstart, _add_pipeline, _add_agent):  # fmt: skip
        add(sub)
    return p


def _add_convert(sub) -> None:
    c = sub.add_parser("convert", help="convert a checkpoint between formats")
    c.add_argument("src", help="checkpoint directory (native, transformers LLaVA/Llama/Mistral/Qwen2, ...)")
    c.add_argument("dst", help="output directory")
    c.add_argument(
        "--to",
        choices=["native", "hf-llava", "peft"],
        default="native",
        help="peft: the model's LoRA as a PEFT adapter (adapter_config.json + adapter_model.safetensors)",
    )
    c.add_argument(
        "--from",
        dest="src_format",
        choices=["peft"],
        default=None,
        help="peft: src is a PEFT LoRA adapter, applied to the model given by --base",
    )
    c.add_argument(
        "--base",
        default=None,
        help="the base LLM of a training-run folder (a LoRA or projector-only run); with --from peft, "
        "the model the adapter goes on",
    )
    c.add_argument("--merge", action="store_true", help="fold the LoRA into the weights (no adapter left)")
    c.add_argument(
        "--vision-tower", default=None, help="the vision tower folder a checkpoint names but does not hold"
    )
    c.set_defaults(func=_convert)


def _add_data(sub) -> None:
    d = sub.add_parser("data", help="data sets: generate ShapesWorld, inspect a data file")
    dsub = d.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("shapes", help="write the embedded ShapesWorld data set (LLaVA JSON + PNG)")
    s.add_argument("out")
    s.add_argument("--train", type=int, default=4000, help="training scenes")
    s.add_argument("--eval", type=int, default=400, help="held-out scenes")
    s.add_argument("--text", type=int, default=4000, help="text-only documents")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=96)
    s.add_argument("--image-placement", choices=("before", "after", "mixed"), default="after",
                   help="image placeholder after or before each question, or either per sample")  # fmt: skip
    s.add_argument("--layout", choices=("single", "conversation"), default="single",
                   help="instruct.json: each question its own sample, or --turns questions per conversation")  # fmt: skip
    s.add_argument("--turns", type=int, default=4, help="questions per conversation (--layout conversation)")
    s.add_argument("--short-references", type=float, default=0.0, metavar="SHARE",
                   help="share of training position questions asked by the one attribute that singles "
                        "the object out (\"Where is the star?\"); 0: all by colour and shape")  # fmt: skip
    s.set_defaults(func=_data_shapes)
    sy = dsub.add_parser(
        "synthesize", help="write LLaVA-style instruction data with an OpenAI-compatible LLM"
    )
    sy.add_argument("--annotations", required=True, help="JSONL of captions + boxes, or COCO instances JSON")
    sy.add_argument("--captions", default=None, help="COCO captions JSON (with COCO instances)")
    sy.add_argument("--kind", required=True, choices=["conversation", "detail", "reasoning"])
    sy.add_argument("--endpoint", required=True, help="OpenAI-compatible base URL (.../v1)")
    sy.add_argument("--model", required=True)
    sy.add_argument("--api-key-env", default=None, help="environment variable holding the API key")
    sy.add_argument("--out", required=True, help="output LLaVA JSON")
    sy.add_argument("--concurrency", type=int, default=8)
    sy.add_argument("--limit", type=int, default=None)
    sy.add_argument("--timeout", type=float, default=60.0, help="per-request timeout (s)")
    sy.add_argument("--retries", type=int, default=5)
    sy.add_argument("--prompts", default=None, help="directory of <kind>.json prompt files")
    sy.add_argument("--no-progress", action="store_true")
    sy.set_defaults(func=_data_synthesize)

    i = dsub.add_parser("inspect", help="counts, lengths, supervision and rejected samples of a data file")
    i.add_argument("file")
    i.add_argument("--images", help="image root (default: the file's folder)")
    i.add_argument("--model", help="model directory (its tokenizer, template inputs and image size)")
    i.add_argument("--tokenizer", help="tokenizer directory (tokenizer.json)")
    i.add_argument("--template", default="vicuna_v1")
    i.add_argument("--image-tokens", type=int, default=1, help="placeholder ids per image")
    i.add_argument("--image-token-id", type=int, default=None)
    i.add_argument("--image-size", type=int, default=224)
    i.add_argument("--max-length", type=int, default=2048)
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.add_argument("--no-color", action="store_true")
    i.set_defaults(func=_data_inspect)


def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help="answer one prompt (optionally about images)")
    g.add_argument("--model", required=True, help="model directory (with its tokenizer)")
    g.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--template", default=None, help="chat template (default: the model's own)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--json", action="store_true", help="print text, finish reason and token counts as JSON")
    _compile_flag(g)
    _model_flags(g)
    g.set_defaults(func=_generate)


def _add_chat(sub) -> None:
    ch = sub.add_parser("chat", help="interactive multi-turn chat (/image PATH, /reset, /quit)")
    ch.add_argument("--model", required=True)
    ch.add_argument("--image", action="append", default=[])
    ch.add_argument("--template", default=None)
    ch.add_argument("--max-new-tokens", type=int, default=256)
    ch.add_argument("--temperature", type=float, default=0.0)
    _compile_flag(ch)
    _prefix_cache_flag(ch)
    _model_flags(ch)
    ch.set_defaults(func=_chat)


def _add_serve(sub) -> None:
    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a web chat page (docs/security.md)")
    sv.add_argument("--model", required=True)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key-file", default=None,
                    help="require 'Authorization: Bearer KEY' on /v1/* and /metrics, KEY read from this file "
                    "(or the MODALIGN_API_KEY environment variable)")  # fmt: skip
    sv.add_argument(
        "--api-key", default=None, help="the key on the command line (visible in ps: prefer the file)"
    )
    sv.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                    help="without a key, the Host names answered besides localhost (repeatable; '*': any)")  # fmt: skip
    sv.add_argument("--template", default=None)
    sv.add_argument("--name", default=None, help="model id reported by /v1/models (default: the folder name)")
    sv.add_argument(
        "--max-batch",
        type=int,
        default=32,
        help="requests decoded together (more clients than this wait for a free row)",
    )
    sv.add_argument("--max-images", type=int, default=8, help="images per request")
    sv.add_argument("--image-cache-mb", type=float, default=256,
                    help="visual tokens of images already seen are reused, up to this many MiB (0: off)")  # fmt: skip
    _prefix_cache_flag(sv)
    sv.add_argument("--decoded-image-cache-mb", type=float, default=64,
                    help="uploads seen before skip decoding and resizing: their pixels kept by a digest of the "
                         "bytes, up to this many MiB (0: off)")  # fmt: skip
    sv.add_argument("--max-body-mb", type=float, default=20)
    sv.add_argument("--max-connections", type=int, default=256, help="open connections (more get 503)")
    sv.add_argument(
        "--request-timeout", type=float, default=600, help="seconds from a request to its last token"
    )
    sv.add_argument("--compile", action="store_true",
                    help="torch.compile the decode step (one graph for any batch, compiled before the server "
                    "listens; docs/benchmarks.md)")  # fmt: skip
    sv.add_argument("--image-dir", default=None, help="allow local image paths inside this directory")
    sv.add_argument("--allow-http-images", action="append", default=[], metavar="DOMAIN",
                    help="fetch http(s) images from this domain (repeatable); off by default")  # fmt: skip
    _model_flags(sv)
    sv.set_defaults(func=_serve)


def _add_eval(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a model on a benchmark file (or compare result files)")
    ev.add_argument("--model", help="model directory")
    ev.add_argument("--task", help="shapes | vqa | exact | mc | pope | mme | caption | llava-bench | owleval")
    ev.add_argument("--data", help="benchmark file")
    ev.add_argument("--images", default=None, help="image root (default: the data file's folder)")
    ev.add_argument("--limit", type=int, default=None)
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--max-new-tokens", type=int, default=32)
    ev.add_argument("--circular", action="store_true", help="MMBench circular evaluation (task mc)")
    ev.add_argument("--bad-samples", choices=["skip", "error"], default="skip")
    ev.add_argument("--template", default=None)
    ev.add_argument("--out", default=None, help="output directory (samples.jsonl, results.json, report.md)")
    ev.add_argument(
        "--compare", nargs="+", metavar="RESULTS", help="print a side-by-side table of results.json files"
    )
    ev.add_argument("--references", default=None, help="llava-bench: reference answers JSONL")
    ev.add_argument("--judge-endpoint", action="append", default=None,
                    help="OpenAI-compatible base URL of the judge (.../v1); twice for two judges")  # fmt: skip
    ev.add_argument("--judge-model", action="append", default=None,
                    help="the judge's model name; twice for two judges (same endpoint if given once)")  # fmt: skip
    ev.add_argument("--judge-api-key-env", action="append", default=None,
                    help="environment variable holding the judge's API key (once for both, or once per judge)")  # fmt: skip
    ev.add_argument("--judge-cache", default=str(Path.home() / ".cache" / "modalign" / "judge_cache.jsonl"))
    _model_flags(ev)
    ev.set_defaults(func=_eval)


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="run a training recipe (YAML) stage by stage; resumes automatically")
    t.add_argument(
        "recipe", help="recipe file, or the name of a shipped one (llava-1.5, ..., tiny-llava, ...)"
    )
    t.add_argument("--out", default=None, help="run directory (default: runs/<recipe name>)")
    t.add_argument("--data", default="data", help="value of ${data} in the recipe")
    t.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="other ${NAME} values")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    t.add_argument("--stage", action="append", default=None, help="run only these stages")
    t.add_argument(
        "--plan",
        action="store_true",
        help="print parameters, memory per GPU and time per stage; train nothing",
    )
    t.add_argument(
        "--gpus", type=int, default=None, help="--plan: GPUs to plan for (default: WORLD_SIZE or 1)"
    )
    t.add_argument(
        "--gpu-tflops", type=float, default=312.0, help="--plan: peak dense bf16 TFLOP/s of one GPU"
    )
    t.add_argument("--mfu", type=float, default=0.4, help="--plan: the fraction of the peak a step reaches")
    t.add_argument(
        "--device", default="auto", help="cpu | cuda | cuda:N | mps | auto (under torchrun: each rank's GPU)"
    )
    t.add_argument("--dtype", default="auto",
                   help="every stage's precision: float32 | bfloat16 (autocast) | bfloat16-pure | auto (the recipe's)")  # fmt: skip
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_train)


def _add_quickstart(sub) -> None:
    q = sub.add_parser("quickstart", help="train a miniature multimodal LLM end to end on CPU")
    q.add_argument("--method", default="llava", help="llava | mplug-owl | mplug-owl2 | xcomposer2 | blip2 | minigpt4 | "
                   "flamingo | llama-adapter, several comma-separated, seed (the first four), survey (the last four) or all")  # fmt: skip
    q.add_argument("--out", default=None, help="runs/quickstart (runs/claims with --study claims)")
    q.add_argument("--scale", type=float, default=1.0, help="data size multiplier (1.0: 4000 train scenes)")
    q.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. stages.instruct.stop.max_steps=100 (stage0.* for stage 0)",
    )
    q.add_argument("--pipelines", default=None, help="then the frozen-LLM pipelines on the same questions: pica, "
                   "img2llm, pnp-vqa, agent, comma-separated, or all (docs/pipelines.md); --set captioner.*, "
                   "itm.*, agent-llm.* override the parts they train")  # fmt: skip
    q.add_argument(
        "--pipeline-images", type=int, default=100, help="held-out images the pipelines answer about"
    )
    q.add_argument("--study", default=None, choices=["claims"],
                   help="claims: each seed paper's central claim, its choice against the alternatives, over "
                   "--seeds (docs/shapesworld.md)")  # fmt: skip
    q.add_argument("--seeds", default="0,1,2", help="stage-0 seeds of the study, comma-separated")
    q.add_argument("--claims", default=None, help="only these claims of the study (comma-separated ids)")
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(func=_quickstart)


def _llm_flags(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--llm-endpoint", default=None, help=f"OpenAI-compatible base URL of the {what} (…/v1)")
    p.add_argument("--llm-model", default=None, help="the model name the endpoint serves")
    p.add_argument("--api-key-env", default=None, help="environment variable holding the endpoint's API key")


def _add_pipeline(sub) -> None:
    pl = sub.add_parser("pipeline", help="answer visual questions with a frozen LLM over captions: PICa, Img2LLM, "
                        "PNP-VQA (docs/pipelines.md)")  # fmt: skip
    pl.add_argument("name", choices=["pica", "img2llm", "pnp-vqa"])
    pl.add_argument(
        "--questions", required=True, help="LLaVA-format JSON: image, conversations (question, answer)"
    )
    pl.add_argument("--image-root", default=None, help="the folder the images' paths are relative to "
                    "(default: the questions file's; for --shots, the shots file's)")  # fmt: skip
    pl.add_argument("--captioner", required=True, help="modalign model directory that captions images")
    pl.add_argument("--caption-prompt", default="Describe the image briefly.")
    pl.add_argument("--llm", default=None, help="a local modalign model directory as the frozen LLM")
    pl.add_argument("--llm-chat", action="store_true", help="prompt the local LLM in its chat template")
    _llm_flags(pl, "frozen LLM")
    pl.add_argument(
        "--shots", default=None, help="PICa: answered questions (LLaVA JSON) to draw examples from"
    )
    pl.add_argument("--n-shot", type=int, default=16)
    pl.add_argument("--n-ensemble", type=int, default=5)
    pl.add_argument("--metric", default="imagequestion", choices=["imagequestion", "question", "random"])
    pl.add_argument("--captions-per-image", type=int, default=5, help="Img2LLM")
    pl.add_argument("--n-answers", type=int, default=30, help="Img2LLM: answer candidates")
    pl.add_argument("--itm", default=None, help="PNP-VQA: a model with a Q-Former itm head")
    pl.add_argument("--num-patches", type=int, default=20)
    pl.add_argument("--num-captions", type=int, default=5)
    pl.add_argument("--qa-format", default=None, help="PNP-VQA: the QA prompt, with {question} and {context}")
    pl.add_argument("--limit", type=int, default=None, help="answer the first N questions")
    pl.add_argument("--out", default=None, help="write results.json and samples.jsonl here")
    pl.add_argument("--seed", type=int, default=0)
    pl.add_argument("--no-progress", action="store_true")
    pl.set_defaults(func=_pipeline)


def _add_agent(sub) -> None:
    ag = sub.add_parser("agent", help="an LLM with tool calls over modalign vision experts (MM-REACT style)")
    _llm_flags(ag, "LLM that calls the tools")
    ag.add_argument("--captioner", required=True, help="modalign model directory behind caption")
    ag.add_argument("--vqa", default=None, help="modalign model directory behind vqa, count, read_text, "
                    "list_objects (default: the captioner)")  # fmt: skip
    ag.add_argument("--template", default=None, help="the experts' chat template (default: their own)")
    ag.add_argument("--tools", default="caption,vqa,list_objects,count,read_text")
    ag.add_argument("--image", action="append", default=[], help="an image (image_1, image_2, ... in order)")
    ag.add_argument("--question", required=True)
    ag.add_argument("--max-steps", type=int, default=6)
    ag.add_argument("--max-tokens", type=int, default=4096, help="LLM tokens over the whole run")
    ag.add_argument("--log", default=None, help="append each step as a JSON line to this file")
    ag.add_argument("--json", action="store_true", help="print the answer and every step as JSON")
    ag.set_defaults(func=_agent)


def _generate(args) -> int:
    from modalign.infer.chat import user_message

    cm = _load_chat(args, compile=getattr(args, "compile", False))
    params = cm.params(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                       top_k=args.top_k, seed=args.seed)  # fmt: skip
    msgs = [user_message(args.prompt, len(args.image))]
    if args.json:
        r = cm.reply(msgs, args.image, params)
        print(json.dumps({"text": r.text, "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens,
                          "completion_tokens": r.completion_tokens, "token_ids": r.token_ids}))  # fmt: skip
        return 0
    for piece in cm.stream(msgs, args.image, params):
        print(piece, end="", flush=True)
    print()
    return 0


def _chat(args) -> int:
    from modalign.data.conversation import Message
    from modalign.infer.chat import user_message

    cm = _load_chat(args, compile=getattr(args, "compile", False))
    params = cm.params(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    history, images, pending = [], [], list(args.image)
    print("modalign chat: /image PATH adds an image to your next message, /reset clears, /quit exits")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            history, images, pending = [], [], []
            print("(conversation cleared)")
            continue
        if line.startswith("/image"):
            path = line[len("/image") :].strip()
            if not Path(path).is_file():
                print(f"(no such file: {path})")
            else:
                pending.append(path)
                print(f"(image {path} attached to your next message)")
            continue
        history.append(user_message(line, len(pending)))
        images += pending
        attached, pending = len(pending), []
        print("assistant> ", end="", flush=True)
        reply = ""
        try:
            for piece in cm.stream(history, images, params):
                reply += piece
                print(piece, end="", flush=True)
        except ValueError as e:  # the turn is undone, its images with it: the next one starts clean
            history.pop()
            del images[len(images) - attached :]
            dropped = f"; its {attached} image(s) dropped" if attached else ""
            hint = " (/reset starts a new conversation)" if "context length" in str(e) else ""
            print(f"(error: {e}{dropped}){hint}")
            continue
        print()
        history.append(Message("assistant", reply))


def _api_key(args) -> str | None:
    """The server's key: --api-key-file, else MODALIGN_API_KEY, else --api-key (None: no key)."""
    import os

    if args.api_key_file:
        key = Path(args.api_key_file).read_text().strip()
        if not key:
            raise ValueError(f"--api-key-file {args.api_key_file} is empty")
        return key
    return os.environ.get("MODALIGN_API_KEY") or args.api_key


def _serve(args) -> int:
    from modalign.devices import in_own_thread
    from modalign.serve.app import ServeConfig, create_app
    from modalign.serve.images import ImagePolicy
    from modalign.serve.server import serve

    key = _api_key(args)
    # loaded in a thread of its own: the generation worker is then the one thread with OpenMP
    # threads (``in_own_thread``)
    cm = in_own_thread(_load_chat, args, compile=args.compile)
    policy = ImagePolicy(local_dir=args.image_dir, allow_http=bool(args.allow_http_images),
                         allowed_domains=[d.lower() for d in args.allow_http_images])  # fmt: skip
    hosts = list(args.allowed_host) + ([args.host] if args.host not in ("0.0.0.0", "::") else [])
    cfg = ServeConfig(model_name=args.name or Path(args.model).resolve().name, api_key=key, allowed_hosts=hosts,
                      max_body_bytes=int(args.max_body_mb * 2**20), max_images=args.max_images,
                      max_batch=args.max_batch, request_timeout_s=args.request_timeout, images=policy,
                      decoded_image_cache_mb=args.decoded_image_cache_mb)  # fmt: skip
    if key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            "warning: serving without an API key on a non-loopback address (--api-key-file)", file=sys.stderr
        )
    serve(create_app(cm, cfg), host=args.host, port=args.port, max_connections=args.max_connections)
    return 0


def _eval(args) -> int:
    from modalign.eval import run as tasks
    from modalign.shapesworld import benchmark  # noqa: F401  (registers the "shapes" task)

    if args.compare:
        print(tasks.compare(args.compare))
        return 0
    for name in ("model", "task", "data", "out"):
        if getattr(args, name) is None:
            raise ValueError(f"--{name} is required (or use --compare RESULTS...)")

    judge = None
    if args.judge_endpoint:
        from modalign.eval.judge import JudgePanel
        from modalign.llm_client import LLMClient

        eps, models, keys = (
            args.judge_endpoint,
            args.judge_model or ["judge"],
            args.judge_api_key_env or [None],
        )
        n = max(len(eps), len(models))
        if n > 2 or any(len(x) not in (1, n) for x in (eps, models, keys)):
            raise ValueError(
                "give --judge-endpoint / --judge-model / --judge-api-key-env once, or twice for two judges"
            )
        clients = [LLMClient.from_env(eps[min(i, len(eps) - 1)], models[min(i, len(models) - 1)],
                                      keys[min(i, len(keys) - 1)]) for i in range(n)]  # fmt: skip
        judge = clients[0] if n == 1 else JudgePanel(clients)
    cm = _load_chat(args, compile=getattr(args, "compile", False))
    cm.path = args.model
    res = tasks.evaluate(cm, args.task, Path(args.data), args.images, Path(args.out), args.limit, args.batch_size,
                         args.max_new_tokens, args.circular, args.bad_samples, judge=judge,
                         references=args.references, judge_cache=Path(args.judge_cache))  # fmt: skip
    shown = {k: v for k, v in res.items() if k not in ("generation",)}
    print(json.dumps(shown, indent=2, default=str))
    return 0


def _train(args) -> int:
    import logging

    from modalign.shapesworld import RECIPES
    from modalign.train.recipe import load_recipe

    variables = {"data": args.data}
    for v in args.var:
        name, _, value = v.partition("=")
        variables[name] = value
    out = args.out
    recipe = load_recipe(args.recipe, variables | {"out": out or "runs"}, args.set, search=[RECIPES])
    precision = {"auto": None, "float32": "fp32", "fp32": "fp32", "bfloat16": "bf16", "bf16": "bf16",
                 "bfloat16-pure": "bf16-pure", "bf16-pure": "bf16-pure"}  # fmt: skip
    if args.dtype not in precision:
        raise ValueError(f"--dtype: unknown {args.dtype!r}; use float32, bfloat16, bfloat16-pure or auto")
    if precision[args.dtype] is not None:
        for stage in recipe.stages:
            stage.precision = precision[args.dtype]
    if args.plan:
        import os

        from modalign.train.plan import format_plan, plan

        gpus = args.gpus or int(os.environ.get("WORLD_SIZE", "1"))
        print(format_plan(recipe, plan(recipe, gpus, args.gpu_tflops, args.mfu), args.gpu_tflops, args.mfu))
        return 0
    from modalign.train.parallel import init_distributed
    from modalign.train.run import run_recipe

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    d = init_distributed(args.device)
    torch_threads_for_workers(d)
    run_recipe(recipe, out or f"runs/{recipe.name}", d, progress=not args.no_progress, stages=args.stage)
    if d.enabled:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def torch_threads_for_workers(d) -> None:
    """Split the CPU cores between local processes (torchrun on CPU)."""
    import os

    import torch

    if d.enabled and d.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(
            max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", d.world)))
        )


def _quickstart(args) -> int:
    from modalign.shapesworld.pipelines import PARTS, SHAPES_PIPELINES
    from modalign.shapesworld.quickstart import quickstart

    names = None
    if args.pipelines:
        names = (
            list(SHAPES_PIPELINES)
            if args.pipelines == "all"
            else [n.strip() for n in args.pipelines.split(",")]
        )
        bad = [n for n in names if n not in SHAPES_PIPELINES]
        if bad:
            raise ValueError(
                f"--pipelines: unknown {', '.join(bad)}; known: {', '.join(SHAPES_PIPELINES)}, all"
            )
    if args.study == "claims":
        from modalign.shapesworld.claims import run_claims

        if names:
            raise ValueError("--pipelines runs after a quickstart, not after --study claims")
        try:
            seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--seeds: comma-separated integers expected, got {args.seeds!r}") from None
        run_claims(args.out or "runs/claims", seeds, args.scale, args.set, args.claims,
                   progress=not args.no_progress)  # fmt: skip
        return 0
    args.out = args.out or "runs/quickstart"
    parts = tuple(f"{p}." for p in PARTS)
    quickstart(args.method, args.out, args.scale, [s for s in args.set if not s.startswith(parts)],
               progress=not args.no_progress)  # fmt: skip
    if names:
        from modalign.shapesworld.pipelines import run_pipelines

        run_pipelines(names, args.out, args.pipeline_images, progress=not args.no_progress,
                      sets=[s for s in args.set if s.startswith(parts)])  # fmt: skip
    return 0


def _llm_client(args):
    from modalign.llm_client import LLMClient

    if not args.llm_model:
        raise ValueError("--llm-endpoint needs --llm-model (the name the endpoint serves)")
    return LLMClient.from_env(args.llm_endpoint, args.llm_model, args.api_key_env)


def _pipeline(args) -> int:
    import torch

    from modalign.data.images import ImageProcessor, resolve_image_path
    from modalign.data.tokenizer import Tokenizer
    from modalign.infer.chat import ChatModel
    from modalign.models.mllm import MLLM
    from modalign.pipelines.pica import EndpointCompleter, LocalCompleter
    from modalign.pipelines.run import (
        Captioner,
        ChatCompleter,
        build_shots,
        load_questions,
        run_pipeline,
        score,
    )

    if (args.llm is None) == (args.llm_endpoint is None):
        raise ValueError("give the frozen LLM as --llm DIR or --llm-endpoint URL (one of them)")
    records = load_questions(args.questions)[: args.limit]
    cm = ChatModel.load(args.captioner)
    captioner = Captioner(cm, args.caption_prompt)

    def pixels_of(recs, root, proc=None):
        root = Path(args.image_root) if args.image_root else root
        return {
            p: (proc or cm.images)(resolve_image_path(root, p, p))
            for p in dict.fromkeys(r["image"] for r in recs)
        }

    llm = tok = None
    if args.llm is not None:
        llm, tok = MLLM.from_pretrained(args.llm, dtype=torch.float32), Tokenizer.from_dir(args.llm)
        completer = (
            ChatCompleter(llm, tok, tok.template_name or "chatml")
            if args.llm_chat
            else LocalCompleter(llm, tok)
        )
    else:
        completer = EndpointCompleter(_llm_client(args))
    kw = {}
    if args.name == "pica":
        if not args.shots:
            raise ValueError("pica needs --shots: answered questions to draw in-context examples from")
        if args.metric != "random" and llm is None:
            raise ValueError(f"pica --metric {args.metric} embeds questions with a local model: give --llm, "
                             "or use --metric random with an endpoint")  # fmt: skip
        shots_recs = [r for r in load_questions(args.shots) if r["answer"]]
        kw["shots"] = build_shots(
            shots_recs, pixels_of(shots_recs, Path(args.shots).parent), captioner, llm, tok
        )
    if args.name == "pnp-vqa":
        if not args.itm:
            raise ValueError(
                "pnp-vqa needs --itm: a model with a Q-Former itm head (e.g. a BLIP-2 stage-1 run)"
            )
        itm = MLLM.from_pretrained(args.itm, dtype=torch.float32)
        kw["itm"] = (itm, Tokenizer.from_dir(args.itm))
        kw["itm_pixels"] = pixels_of(records, Path(args.questions).parent, ImageProcessor(itm.config.vision))
    run = run_pipeline(args.name, records, pixels_of(records, Path(args.questions).parent), captioner, completer, llm=llm, tok=tok,
                       progress=not args.no_progress, seed=args.seed, n_shot=args.n_shot, n_ensemble=args.n_ensemble,
                       metric=args.metric, captions_per_image=args.captions_per_image, n_answers=args.n_answers,
                       num_patches=args.num_patches, num_captions=args.num_captions, qa_format=args.qa_format,
                       **kw)  # fmt: skip
    result = {"pipeline": args.name, "settings": run.settings, "llm_calls": run.llm_calls,
              "llm_tokens": run.llm_tokens, "caption_calls": run.caption_calls,
              "seconds_per_question": run.seconds / max(len(records), 1)}  # fmt: skip
    if all(r["answer"] for r in records):
        result |= score(records, run.predictions)
    print(json.dumps(result, indent=2))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        with (out / "samples.jsonl").open("w") as f:
            for s in run.samples:
                f.write(json.dumps(s) + "\n")
    return 0


def _agent(args) -> int:
    from modalign.infer.chat import ChatModel
    from modalign.pipelines.agent import Experts, vision_agent

    if not args.llm_endpoint:
        raise ValueError(
            "the agent needs --llm-endpoint (any OpenAI-compatible server, modalign serve included)"
        )
    for p in args.image:
        if not Path(p).is_file():
            raise FileNotFoundError(f"--image {p}: no such file")
    cap = ChatModel.load(args.captioner, args.template)
    vqa = ChatModel.load(args.vqa, args.template) if args.vqa else cap
    tools = tuple(t.strip() for t in args.tools.split(",") if t.strip())
    agent = vision_agent(_llm_client(args), Experts(cap, vqa), tools, max_steps=args.max_steps,
                         max_tokens=args.max_tokens, log=args.log)  # fmt: skip
    r = agent.run(args.question, list(args.image))
    if args.json:
        print(json.dumps({"answer": r.answer, "stop": r.stop, "llm_calls": r.llm_calls, "tokens": r.tokens,
                          "tool_calls": r.tool_calls, "steps": r.steps}, indent=2))  # fmt: skip
        return 0
    for s in r.steps:
        for c in s["tool_calls"]:
            print(f"[step {s['step']}] {c['name']}({c['arguments']}) -> {c['observation']}")
    print(r.answer if r.answer is not None else f"(no answer: stopped at {r.stop})")
    return 0


def main(argv: list[str] | None = None) -> int:
    from modalign.llm_client import LLMError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    # bad input, and an endpoint out of retries: said in one line, not a traceback
    except (ValueError, FileNotFoundError, LLMError) as e:
        print(f"modalign {args.command}: error: {e}", file=sys.stderr)
        return 2


def main_entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
