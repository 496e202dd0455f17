"""Qwen-Image-Edit-F2P as a hotpipe Python pipeline: a tight face crop in, a full-body
photo of that person out, with each photo's own prompt, negative prompt, seed and step
count (hotpipe's [params]).

Two libraries, chosen by `[model.options] library`:
- "diffsynth" (default): DiffSynth-Studio's `QwenImagePipeline` with `edit_image`, the
  code the F2P model card runs; the LoRA is fused by DiffSynth's own `load_lora`.
- "diffusers": `QwenImageEditPipeline` (`pipeline = "edit"`, Qwen/Qwen-Image-Edit, which
  F2P was trained on) or `QwenImageEditPlusPipeline` (`pipeline = "edit-plus"`, for
  Qwen-Image-Edit-2509/2511: set `model`); the LoRA goes through diffusers'
  `load_lora_weights`, which converts DiffSynth's key format, and is fused.

The tests run this file unchanged on a tiny random-weights copy of the same architecture
(scripts/f2p_tiny/make.py), with only the model paths and the device differing from
examples/f2p/pipeline.toml.
"""

import contextlib
import importlib.metadata
import io
import os
import sys

import numpy as np
import torch
from PIL import Image

# The model each pipeline class was made for (`model` overrides it).
DEFAULT_MODEL = {"edit": "Qwen/Qwen-Image-Edit", "edit-plus": "Qwen/Qwen-Image-Edit-2509"}


class F2P:
    # hotpipe hands __call__ numpy arrays; both libraries take PIL images.
    inputs = "numpy"

    def __init__(self, device, options):
        self.library = options.get("library", "diffsynth")
        self.kind = options.get("pipeline", "edit")
        if self.library not in ("diffsynth", "diffusers"):
            raise ValueError(f'library = "{self.library}": expected "diffsynth" or "diffusers"')
        if self.kind not in DEFAULT_MODEL:
            raise ValueError(f'pipeline = "{self.kind}": expected "edit" or "edit-plus"')
        self.model = options.get("model", DEFAULT_MODEL[self.kind])
        self.models = options.get("models")  # a folder laid out as <model_id>/..., or the hub
        self.device = device
        # bf16 on a GPU (what the model was trained in); fp32 on the CPU, where bf16 is slow.
        self.dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        self.height = int(options.get("height", 1152))
        self.width = int(options.get("width", 864))
        self.cfg_scale = float(options.get("cfg_scale", 4.0))
        if self.library == "diffsynth":
            self.pipe = self._diffsynth()
        else:
            self.pipe = self._diffusers()
        self.lora = None
        if options.get("lora"):
            self.lora = self._apply_lora(options["lora"], float(options.get("lora_scale", 1.0)))

    def _diffsynth(self):
        from diffsynth.pipelines.qwen_image import ModelConfig, QwenImagePipeline

        local = {"local_model_path": self.models, "skip_download": True} if self.models else {}

        def cfg(model_id, pattern):
            return ModelConfig(model_id=model_id, origin_file_pattern=pattern, **local)

        with _quiet("DiffSynth's loader"):
            return QwenImagePipeline.from_pretrained(
                torch_dtype=self.dtype,
                device=self.device,
                model_configs=[
                    cfg(self.model, "transformer/diffusion_pytorch_model*.safetensors"),
                    cfg("Qwen/Qwen-Image", "text_encoder/model*.safetensors"),
                    cfg("Qwen/Qwen-Image", "vae/diffusion_pytorch_model.safetensors"),
                ],
                tokenizer_config=None,
                processor_config=cfg(self.model, "processor/"),
            )

    def _diffusers(self):
        import diffusers
        import transformers

        # Loading bars are noise in a service's log.
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        cls = {"edit": diffusers.QwenImageEditPipeline,
               "edit-plus": diffusers.QwenImageEditPlusPipeline}[self.kind]
        source = os.path.join(self.models, self.model) if self.models else self.model
        pipe = cls.from_pretrained(source, dtype=self.dtype, local_files_only=bool(self.models))
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(self.device)

    def _transformer(self):
        return self.pipe.dit if self.library == "diffsynth" else self.pipe.transformer

    def _apply_lora(self, path, scale):
        """Fuse the LoRA at `path` into the transformer with the library's own loader, and
        fail when it changed nothing (a LoRA for another model loads without error)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"the LoRA {path} does not exist ([model.options] lora)")
        dit = self._transformer()
        before = [p.detach().float().abs().sum() for p in dit.parameters()]
        with _quiet("the LoRA loader"):
            if self.library == "diffsynth":
                self.pipe.load_lora(dit, path, alpha=scale)
            else:
                self.pipe.load_lora_weights(path, adapter_name="f2p")
                self.pipe.fuse_lora(lora_scale=scale, adapter_names=["f2p"])
                self.pipe.unload_lora_weights()
        changed = sum(
            int(not torch.equal(b, p.detach().float().abs().sum()))
            for b, p in zip(before, dit.parameters())
        )
        if changed == 0:
            raise ValueError(f"the LoRA {path} changed no weight of the transformer: is it a LoRA for {self.model}?")
        return {"path": os.path.abspath(path), "scale": scale, "tensors_changed": changed}

    def describe(self):
        """What hotpipe's `check` prints and every output's sidecar records."""
        pipe = type(self.pipe)
        return {
            "pipeline": f"{pipe.__module__}.{pipe.__qualname__}",
            "library": self.library,
            "version": importlib.metadata.version(self.library),
            "torch": torch.__version__,
            "model": self.model,
            "models": os.path.abspath(self.models) if self.models else None,
            "lora": self.lora,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    def output_shape(self, height, width, channels):
        return (1, self.height, self.width, 3)

    def __call__(self, images, params):
        # One face at a time: a 20B transformer at 1152 x 864 fills a GPU with one image.
        out = [self.generate(face, p) for face, p in zip(images, params)]
        return np.stack(out)

    def generate(self, face, p):
        face = Image.fromarray(np.ascontiguousarray(face[:, :, :3]))
        prompt, negative = p["prompt"], p.get("negative_prompt", "")
        seed, steps = int(p["seed"]), int(p["steps"])
        cfg = float(p.get("cfg_scale", self.cfg_scale))
        if self.library == "diffsynth":
            # One QwenImagePipeline serves every Edit model: a list of edit images is the
            # 2509/2511 (edit-plus) prompt form.
            edit = [face] if self.kind == "edit-plus" else face
            image = self.pipe(
                prompt, negative_prompt=negative, cfg_scale=cfg, edit_image=edit, seed=seed,
                num_inference_steps=steps, height=self.height, width=self.width,
                progress_bar_cmd=lambda steps: steps,
            )
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
        # diffusers: the same noise on every device (a CPU generator, as DiffSynth's
        # default rand_device), floats rounded as its own PIL output does.
        image = self.pipe(
            image=face, prompt=prompt, negative_prompt=negative, true_cfg_scale=cfg,
            height=self.height, width=self.width, num_inference_steps=steps,
            generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
        ).images[0]
        return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


@contextlib.contextmanager
def _quiet(what):
    """Hold a library's prints (DiffSynth's loader prints JSON blocks for every file);
    show them only when it fails."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    except BaseException:
        sys.stderr.write(f"{what} printed:\n{buf.getvalue()}")
        raise
