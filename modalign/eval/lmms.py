"""modalign models under lmms-eval (``pip install modalign[lmms]``):

    lmms-eval --model modalign --model_args pretrained=DIR[,template=NAME,dtype=float32,max_new_tokens=N,
              system_prompt=TEXT] --tasks mme --batch_size 8 --device cuda:0

``modalign`` is registered through lmms-eval's ``lmms_eval.models`` entry-point group
(``pyproject.toml``), so nothing needs to be copied into lmms-eval. ``pretrained`` is any model
directory ``ChatModel.load`` takes (``base`` and ``vision_tower`` as for it). Requests:

- ``generate_until``: the context as one user turn, the document's images first (or at its
  ``<image>`` marks when it has one per image), the chat template's generation prompt, then the
  batched engine; the task's ``until`` strings cut the reply, ``max_new_tokens`` / ``temperature``
  / ``top_p`` / ``do_sample`` map to modalign's sampling parameters (greedy unless ``do_sample``).
- ``loglikelihood``: the continuation as the assistant's reply (without the leading space of the
  task's target delimiter: replies are trained without one), rendered with the prompt the way
  training renders it; one forward pass gives (the mean negative log-likelihood of
  its tokens, whether greedy decoding picks every one of them). lmms-eval's own models return
  this loss, not a log-probability, and its ``multiple_choice`` tasks pick the smallest value,
  so modalign does the same (decoder-only language models).
- ``generate_until_multi_round``: rounds until the task's ``doc_to_text`` signals the end, each
  round prompted afresh with the context it returns; the replies of every round.

Images are PIL images, image paths or bytes; a task with video or audio fails naming the visual.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

try:
    from lmms_eval.api.model import lmms
except ImportError as e:  # the optional extra: this module imports, the model asks for lmms-eval
    lmms, _MISSING = object, e
else:
    _MISSING = None
if TYPE_CHECKING:
    from lmms_eval.api.instance import Instance

MODEL_ID = "modalign"
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def manifest():
    """The entry point (group ``lmms_eval.models``) lmms-eval reads to find ``--model modalign``.
    (Imported here: importing ``lmms_eval.models`` loads the entry points, this module among them.)"""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.ModalignLMM")


def _flag(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


class ModalignLMM(lmms):
    """A modalign ``ChatModel`` behind lmms-eval's model interface (one process)."""

    is_simple = True

    def __init__(self, pretrained: str, template: str | None = None, device: str | None = None,
                 dtype: str | None = None, batch_size: int | str = 1, max_new_tokens: int | str = 128,
                 base: str | None = None, vision_tower: str | None = None, system_prompt: str | None = None,
                 progress: bool | str = True, **kwargs) -> None:  # fmt: skip
        if _MISSING is not None:
            raise ImportError(
                f"modalign's lmms-eval model needs lmms-eval: pip install 'modalign[lmms]' ({_MISSING})"
            )
        super().__init__()
        from modalign.infer.chat import ChatModel

        kwargs.pop("max_batch_size", None)  # lmms-eval passes it to every model; one batch size here
        if kwargs:
            raise ValueError(f"unknown model_args for modalign: {', '.join(sorted(kwargs))}")
        self.cm = ChatModel.load(pretrained, template=template, device=device, dtype=dtype, base=base,
                                 vision_tower=vision_tower)  # fmt: skip
        self.path = str(pretrained)
        bs = str(batch_size)
        self.batch_size = 1 if bs.startswith("auto") else int(bs)
        self.max_new_tokens = int(max_new_tokens)
        self.system_prompt = self._resolve_system_prompt(system_prompt) if system_prompt else None
        self.progress = _flag(progress)

    # ------------------------------------------------------------------ prompts

    def _doc(self, task: str, split: str, doc_id: int):
        return self.task_dict[task][split][doc_id]

    def _doc_visuals(self, doc_to_visual, task: str, split: str, doc_id: int) -> list:
        return self._visuals(doc_to_visual, self._doc(task, split, doc_id))

    def _visuals(self, doc_to_visual, doc) -> list:
        """The document's images as ``ChatModel.prompt`` takes them (PIL images, paths, bytes)."""
        if doc_to_visual is None:
            return []
        vis = doc_to_visual(doc)
        if vis is None:
            return []
        out = []
        for v in vis if isinstance(vis, list | tuple) else [vis]:
            if isinstance(v, bytes) or hasattr(v, "convert"):  # bytes or a PIL image
                out.append(v.convert("RGB") if hasattr(v, "convert") else v)
            elif isinstance(v, str | Path) and Path(v).suffix.lower() in _IMAGE_SUFFIXES:
                out.append(str(v))
            else:
                kind = (
                    f"{type(v).__name__} {str(v)[:80]!r}" if isinstance(v, str | Path) else type(v).__name__
                )
                raise ValueError(f"modalign models take images; this task gave a {kind}")
        return out

    def _messages(self, text: str, n_images: int, reply: str | None = None) -> list:
        from modalign.data.conversation import Message
        from modalign.infer.chat import user_message

        msgs = [Message("system", self.system_prompt)] if self.system_prompt else []
        msgs.append(user_message(text, n_images))
        if reply is not None:
            msgs.append(Message("assistant", reply))
        return msgs

    def _params(self, gen_kwargs: dict):
        g = dict(gen_kwargs or {})
        if int(g.get("num_beams", 1) or 1) > 1:
            raise ValueError("modalign's engine does not do beam search (num_beams > 1)")
        until = g.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        sample = _flag(g.get("do_sample", False))
        return self.cm.params(
            max_new_tokens=int(g.get("max_new_tokens") or self.max_new_tokens),
            temperature=float(g.get("temperature") or 0.0) if sample else 0.0,
            top_p=float(g.get("top_p") or 1.0) if sample else 1.0,
            stop=[s for s in until if s],
        )

    def _generate(self, jobs: list[tuple], desc: str | None) -> list[str]:
        """(context, images() -> list, gen_kwargs) -> replies: batches of equal generation settings
        (each batch's images loaded as it runs); ``desc``: the progress bar's, None for none."""
        groups: dict[str, list[int]] = {}
        for i, (_, _, g) in enumerate(jobs):
            groups.setdefault(json.dumps(g or {}, sort_keys=True, default=str), []).append(i)
        out: list[str] = [""] * len(jobs)
        bar = tqdm(
            total=len(jobs),
            desc=desc,
            disable=desc is None or not self.progress or self.rank != 0,
            dynamic_ncols=True,
        )
        for idx in groups.values():
            params = self._params(jobs[idx[0]][2])
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s : s + self.batch_size]
                prompts = []
                for i in chunk:
                    images = jobs[i][1]()
                    prompts.append(self.cm.prompt(self._messages(jobs[i][0], len(images)), images))
                for i, res in zip(chunk, self.cm.engine.generate(prompts, params), strict=True):
                    out[i] = res.text.strip()
                    self.cache_hook.add_partial("generate_until", (jobs[i][0], jobs[i][2]), out[i])
                bar.update(len(chunk))
        bar.close()
        return out

    # ------------------------------------------------------------------ requests

    def generate_until(self, requests: list[Instance]) -> list[str]:
        jobs = []
        for context, gen_kwargs, doc_to_visual, doc_id, task, split in (r.args for r in requests):
            # the document (and its decoded images) fetched when its batch runs
            jobs.append((context, partial(self._doc_visuals, doc_to_visual, task, split, doc_id), gen_kwargs))
        return self._generate(jobs, "modalign generate")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        res = []
        for context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split in (
            r.args for r in requests
        ):
            doc = self._doc(task, split, doc_id)
            images = self._visuals(doc_to_visual, doc)
            rounds: list[str] = []
            info, k = None, 0
            while True:
                if k > 0:
                    vis, context, done, rounds, info = doc_to_text(doc, previous_output=rounds, round_idx=k,
                                                                   previous_round_info=info)  # fmt: skip
                    rounds = list(rounds)
                    if done:
                        break
                    if vis is not None:
                        images = self._visuals(lambda _d, v=vis: v, doc)
                rounds.append(self._generate([(context, lambda im=images: im, gen_kwargs)], None)[0])
                k += 1
            res.append(rounds)
        return res

    @torch.inference_mode()
    def loglikelihood(self, requests: list[Instance]) -> list:
        from modalign.data.conversation import Conversation, render
        from modalign.infer.chat import stop_token_ids
        from modalign.infer.engine import Prompt

        cm, model = self.cm, self.cm.model
        if model.config.llm.is_encoder_decoder:
            raise NotImplementedError("loglikelihood with an encoder-decoder language model (T5)")
        cfg = model.config
        per = model.num_image_tokens() if cfg.placeholder == "per_token" else 1
        stops = set(stop_token_ids(cm.tok, cm.template))
        dev = cm.engine._device()
        out = []
        bar = tqdm(
            total=len(requests), desc="modalign loglikelihood", disable=not self.progress or self.rank != 0
        )
        for r in requests:
            args = r.args
            if len(args) == 2:  # an unconditional request (acc_mutual_info): no document, no images
                context, target, images = args[0], args[1], []
            else:
                context, target, doc_to_visual, doc_id, task, split = args
                doc = self._doc(task, split, doc_id)
                target = target if isinstance(target, str) else target(doc)
                images = self._visuals(doc_to_visual, doc)
            msgs = self._messages(context, len(images), reply=str(target).lstrip())
            rd = render(
                Conversation(msgs, [None] * len(images)), cm.tok, cm.template, cfg.image_token_id, per
            )
            trained = [i for i, t in enumerate(rd.labels) if t != -100]
            while trained and rd.input_ids[trained[-1]] in stops:  # the end-of-turn is not the continuation
                trained.pop()
            if not trained:
                raise ValueError(f"the continuation {target!r} renders to no tokens")
            n = len(rd.input_ids) - trained[0]  # continuation (+ what follows it) counted from the end
            cont = rd.input_ids[trained[0] : trained[-1] + 1]
            if images and cm.images is None:
                raise ValueError("this model takes no images")
            pixels = [cm.images(im) for im in images]
            p = cm.engine._expand(Prompt(rd.input_ids, pixels))
            ids = torch.tensor([p.input_ids], device=dev)
            px = None
            if pixels:
                same = all(x.shape == pixels[0].shape for x in pixels)
                px = torch.stack(p.pixel_values).to(dev) if same else [x.to(dev) for x in p.pixel_values]
            sp = model.embed(ids, px, None, placeholder="per_token")
            mod = sp.modality_ids if px is not None else None  # all-text: no image branch, as the engine
            fwd = model(inputs_embeds=sp.inputs_embeds, modality_ids=mod, attention_mask=sp.attention_mask,
                        media=sp.media)  # fmt: skip
            logits = fwd.logits[0].float()
            t = ids.shape[1]
            pos = torch.arange(t - n - 1, t - n - 1 + len(cont), device=dev)  # the logits predicting cont
            logp = torch.log_softmax(logits[pos], dim=-1)
            want = torch.tensor(cont, device=dev)
            nll = -float(logp.gather(1, want[:, None]).mean())
            greedy = bool((logp.argmax(-1) == want).all())
            out.append(_loglikelihood_result(nll, greedy))
            self.cache_hook.add_partial("loglikelihood", (context, target), (nll, greedy))
            bar.update(1)
        bar.close()
        return out


def _loglikelihood_result(nll: float, greedy: bool):
    """lmms-eval 0.7 passes every response through ``unwrap_generation_output``, which turns a
    ``(float, bool)`` pair into its string (and the task then fails); a ``GenerationResult``
    carrying the pair comes through unchanged. Earlier versions take the pair itself."""
    try:
        from lmms_eval.api.instance import GenerationResult
    except ImportError:
        return (nll, greedy)
    return GenerationResult(text=(nll, greedy))
